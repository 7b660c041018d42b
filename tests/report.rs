//! `tuna report` on a fake results tree: two settings × two seeds, one failed run, one run
//! without metrics, generations for the base model and the fine-tuned runs.

use std::fs;
use std::path::{Path, PathBuf};

use resvg::tiny_skia::Pixmap;
use resvg::usvg;
use tuna::report::chart::PALETTE;
use tuna::report::{self, Options};

const HEADER: &str = "run_id,experiment,status,lora.rank,seed,final_train_loss,best_val_loss,final_val_loss,test_loss,test_ppl,tokens_per_s,peak_mem_mb,wall_s,task_metric,task_score,backend,device";

struct FakeRun {
    id: &'static str,
    rank: u32,
    seed: u32,
    state: &'static str,
    /// best_val_loss, task_score; None = no metrics at all.
    metrics: Option<(f64, f64)>,
}

const RUNS: &[FakeRun] = &[
    FakeRun {
        id: "aaaa000001",
        rank: 4,
        seed: 0,
        state: "done",
        metrics: Some((1.50, 0.25)),
    },
    FakeRun {
        id: "aaaa000002",
        rank: 4,
        seed: 1,
        state: "done",
        metrics: Some((1.54, 0.25)),
    },
    FakeRun {
        id: "bbbb000001",
        rank: 8,
        seed: 0,
        state: "done",
        metrics: Some((1.20, 0.75)),
    },
    FakeRun {
        id: "bbbb000002",
        rank: 8,
        seed: 1,
        state: "done",
        metrics: Some((1.26, 0.50)),
    },
    FakeRun {
        id: "cccc000001",
        rank: 16,
        seed: 0,
        state: "failed",
        metrics: None,
    },
    FakeRun {
        id: "cccc000002",
        rank: 16,
        seed: 1,
        state: "done",
        metrics: None,
    },
];

fn gen_line(prompt: &str, reference: &str, output: &str, seconds: f64, tokens: u32) -> String {
    serde_json::json!({
        "prompt": prompt, "reference": reference, "output": output,
        "seconds": seconds, "tokens": tokens
    })
    .to_string()
        + "\n"
}

/// Writes `<tmp>/results/{leaderboard.csv, diag/<run>/...}`; returns the experiment folder.
fn fake_results(tmp: &Path) -> PathBuf {
    let out = tmp.join("results");
    let exp = out.join("diag");
    let mut csv = format!("{HEADER}\n");
    for r in RUNS {
        let dir = exp.join(r.id);
        fs::create_dir_all(&dir).unwrap();
        let error = if r.state == "failed" {
            r#", "error": "out of memory at step 3""#
        } else {
            ""
        };
        fs::write(
            dir.join("status.json"),
            format!(
                r#"{{"state": "{}"{error}, "updated": 1700000000}}"#,
                r.state
            ),
        )
        .unwrap();
        fs::write(
            dir.join("config.yaml"),
            format!(
                "name: diag\nlora:\n  rank: {}\ntrain:\n  seed: {}\n",
                r.rank, r.seed
            ),
        )
        .unwrap();
        match r.metrics {
            Some((best, task)) => {
                let train = best + 0.3;
                csv.push_str(&format!(
                    "{},diag,{},{},{},{train},{best},{best},{best},{},900,512,60,contains,{task},flex,cpu\n",
                    r.id,
                    r.state,
                    r.rank,
                    r.seed,
                    best.exp()
                ));
                fs::write(
                    dir.join("metrics.json"),
                    serde_json::json!({"final_train_loss": train, "best_val_loss": best,
                        "task_metric": "contains", "task_score": task})
                    .to_string(),
                )
                .unwrap();
                let mut log = String::new();
                for step in [10, 20, 30, 40] {
                    let l = best + 1.0 - step as f64 / 50.0;
                    log.push_str(&format!(
                        r#"{{"kind":"train","step":{step},"train_loss":{l},"lr":0.00002,"tokens_per_s":900}}"#
                    ));
                    log.push('\n');
                }
                for step in [20, 40] {
                    let l = best + 0.5 - step as f64 / 80.0;
                    log.push_str(&format!(r#"{{"kind":"val","step":{step},"val_loss":{l}}}"#));
                    log.push('\n');
                }
                fs::write(dir.join("metrics.jsonl"), log).unwrap();
                let answer = if r.rank == 8 {
                    "You may have Influenza."
                } else {
                    "Maybe a cold?"
                };
                fs::write(
                    dir.join("generations.jsonl"),
                    gen_line("Symptoms: fever, cough", "Influenza", answer, 0.8, 7)
                        + &gen_line("Symptoms: sneezing", "Allergy", "Allergy.", 0.5, 3),
                )
                .unwrap();
            }
            None => csv.push_str(&format!(
                "{},diag,{},{},{},,,,,,,,,,,,\n",
                r.id, r.state, r.rank, r.seed
            )),
        }
    }
    fs::write(out.join("leaderboard.csv"), csv).unwrap();
    fs::write(
        exp.join("base_generations.jsonl"),
        gen_line(
            "Symptoms: fever, cough",
            "Influenza",
            "I do not know.",
            1.5,
            5,
        ) + &gen_line(
            "Symptoms: sneezing",
            "Allergy",
            "Sneezing <b>is</b> common | often",
            2.0,
            6,
        ),
    )
    .unwrap();
    fs::write(
        exp.join("base_metrics.json"),
        r#"{"task_metric": "contains", "task_score": 0.0}"#,
    )
    .unwrap();
    exp
}

fn opts(exp: &Path, compare: Option<&str>) -> Options {
    Options {
        inputs: vec![exp.to_path_buf()],
        out: None,
        metric: "best_val_loss".into(),
        compare: compare.map(String::from),
    }
}

#[test]
fn markdown_report_names_winner_effects_ab_and_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = fake_results(tmp.path());
    let outcome = report::run(&opts(&exp, Some("lora.rank=4,8"))).unwrap();
    assert_eq!(outcome.markdown, exp.join("report.md"));
    assert!(outcome.html.is_file());
    let md = fs::read_to_string(&outcome.markdown).unwrap();
    println!("{md}");

    // Winner, marked in the leaderboard, with mean ± sample std over its 2 seeds.
    assert!(
        md.contains("**Winner: lora.rank=8** with best_val_loss 1.2300 ± 0.0424 (n=2"),
        "{md}"
    );
    assert!(
        md.contains("| **1 ★ winner** | **8** | **1.2300 ± 0.0424** | **2** |"),
        "{md}"
    );
    assert_eq!(outcome.winner.as_deref(), Some("lora.rank=8"));
    assert!(
        outcome.summary.contains("Winner: lora.rank=8"),
        "{}",
        outcome.summary
    );
    assert!(outcome.summary.contains("failed"), "{}", outcome.summary);

    // Effects table: one row per rank value; rank 16 has no finished run with the metric.
    assert!(md.contains("## Effects on best_val_loss"));
    assert!(
        md.contains("| lora.rank | runs | mean best_val_loss ± std | vs best value |"),
        "{md}"
    );
    assert!(md.contains("| 4 | 2 | 1.5200 ± 0.0283 | +0.2900 |"), "{md}");
    assert!(
        md.contains("| **8** | **2** | **1.2300 ± 0.0424** | **best** |"),
        "{md}"
    );
    assert!(md.contains("| 16 | 0 | not measured |"), "{md}");

    // A/B: B − A = 1.23 − 1.52. Expected t, df, p and the 95% CI from
    // scipy 1.17.1: stats.ttest_ind([1.20, 1.26], [1.50, 1.54], equal_var=False) gives
    // statistic -8.043152845265816, pvalue 0.022226787992510058, df 1.7422680412371134;
    // diff ± t.ppf(0.975, df) * se = [-0.46934123536162736, -0.11065876463837271].
    assert!(md.contains("## A/B: lora.rank=4 vs lora.rank=8"), "{md}");
    assert!(
        md.contains("| best_val_loss | 1.5200 ± 0.0283 (2) | 1.2300 ± 0.0424 (2) | -0.2900 | [-0.4693, -0.1107] | -8.043 | 1.74 | 0.0222 | B |"),
        "{md}"
    );
    assert!(md.contains("![A/B: train loss](report_charts/ab-train.svg)"));
    assert!(exp.join("report_charts/ab-train.svg").is_file());
    assert!(exp.join("report_charts/diag-val.svg").is_file());

    // Base vs tuned answers, with time and length; task score base vs tuned.
    assert!(
        md.contains("| base | I do not know. | 1.5000 | 5 |"),
        "{md}"
    );
    assert!(
        md.contains("| lora.rank=8 · seed 0 | You may have Influenza. | 0.8000 | 7 |"),
        "{md}"
    );
    assert!(
        md.contains("Sneezing &lt;b&gt;is&lt;/b&gt; common \\| often"),
        "{md}"
    );
    assert!(md.contains("| base | 0 |"), "{md}");
    assert!(
        md.contains("| lora.rank=8 | 0.6250 ± 0.1768 | 2 | +0.6250 |"),
        "{md}"
    );

    // What is missing: the failed run, the run without metrics.
    assert!(
        md.contains("run `cccc000001` (lora.rank=16, seed 0) failed: out of memory at step 3"),
        "{md}"
    );
    assert!(
        md.contains("run `cccc000002` (lora.rank=16, seed 1) is done but has no best_val_loss (no metrics at all)"),
        "{md}"
    );
    assert!(
        md.contains("no generations.jsonl for 1 done run(s): `cccc000002`"),
        "{md}"
    );
}

#[test]
fn default_ab_is_winner_vs_runner_up_and_run_ids_work() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = fake_results(tmp.path());
    let md = fs::read_to_string(report::run(&opts(&exp, None)).unwrap().markdown).unwrap();
    assert!(md.contains("## A/B: lora.rank=8 vs lora.rank=4"), "{md}");
    assert!(
        md.contains("| +0.2900 | [0.1107, 0.4693] | 8.043 | 1.74 | 0.0222 | A |"),
        "{md}"
    );

    let md = fs::read_to_string(
        report::run(&opts(&exp, Some("aaaa000001,bbbb000002")))
            .unwrap()
            .markdown,
    )
    .unwrap();
    assert!(md.contains("-0.2900 | [-0.4693, -0.1107]"), "{md}");

    let err = report::run(&opts(&exp, Some("lora.rank=4,32"))).unwrap_err();
    assert!(
        format!("{err:#}").contains("no run has lora.rank=32"),
        "{err:#}"
    );
    let empty = exp.parent().unwrap().join("never-swept");
    fs::create_dir_all(&empty).unwrap();
    let err = report::run(&opts(&empty, None)).unwrap_err();
    assert!(
        format!("{err:#}").contains("no runs found for never-swept"),
        "{err:#}"
    );
    let mut o = opts(&exp, None);
    o.metric = "accuracy".into();
    assert!(format!("{:#}", report::run(&o).unwrap_err()).contains("unknown metric"));

    // A higher-is-better metric ranks the other way round.
    let mut o = opts(&exp, None);
    o.metric = "task_score".into();
    let out = report::run(&o).unwrap();
    assert_eq!(out.winner.as_deref(), Some("lora.rank=8"));
}

#[test]
fn leaderboard_csv_input_and_folders_without_leaderboard() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = fake_results(tmp.path());
    let csv = tmp.path().join("results/leaderboard.csv");
    let out = report::run(&Options {
        inputs: vec![csv.clone()],
        out: None,
        metric: "best_val_loss".into(),
        compare: None,
    })
    .unwrap();
    assert_eq!(out.markdown, tmp.path().join("results/report.md"));
    assert_eq!(out.winner.as_deref(), Some("lora.rank=8"));

    // Without the leaderboard, varied keys come from the run configs.
    fs::remove_file(&csv).unwrap();
    let out = report::run(&opts(&exp, None)).unwrap();
    let md = fs::read_to_string(&out.markdown).unwrap();
    assert_eq!(out.winner.as_deref(), Some("lora.rank=8"), "{md}");
    assert!(md.contains("no leaderboard at"), "{md}");
}

/// Every inline `<svg>…</svg>` of an HTML page, in order.
fn inline_svgs(html: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find("<svg") {
        let len = rest[i..].find("</svg>").expect("an <svg> without </svg>") + "</svg>".len();
        out.push(&rest[i..i + len]);
        rest = &rest[i + len..];
    }
    out
}

/// Draws an SVG as a viewer would, minus text (labels are not what is checked) and with
/// crisp edges: anti-aliased black axes would otherwise blend into the palette's grey.
fn render(svg: &str) -> Pixmap {
    let opt = usvg::Options {
        shape_rendering: usvg::ShapeRendering::CrispEdges,
        ..Default::default()
    };
    let tree = usvg::Tree::from_str(svg, &opt).expect("a chart parses as SVG");
    let size = tree.size().to_int_size();
    let mut pixmap = Pixmap::new(size.width(), size.height()).unwrap();
    resvg::render(&tree, usvg::Transform::default(), &mut pixmap.as_mut());
    pixmap
}

/// The plot area: right of the y axis and above the x axis, found as the longest vertical
/// and horizontal runs of dark pixels (the axes are the only dark lines, text is not drawn).
fn plot_area(p: &Pixmap) -> (u32, u32) {
    let dark = |x: u32, y: u32| {
        let c = p.pixel(x, y).unwrap();
        c.red() < 80 && c.green() < 80 && c.blue() < 80 && c.alpha() > 200
    };
    let longest = |n: u32, m: u32, at: &dyn Fn(u32, u32) -> bool| {
        (0..n)
            .max_by_key(|&i| (0..m).filter(|&j| at(i, j)).count())
            .unwrap()
    };
    let axis_x = longest(p.width(), p.height(), &|x, y| dark(x, y));
    let axis_y = longest(p.height(), p.width(), &|y, x| dark(x, y));
    (axis_x, axis_y)
}

/// The palette colours drawn as data series: a colour counts when its pixels inside the plot
/// area span at least a third of the plot's width, as a curve over the steps does. Axes,
/// grid lines and a legend's short colour samples do not, so a chart whose series are
/// missing yields nothing.
fn drawn_series(p: &Pixmap) -> Vec<usize> {
    let (axis_x, axis_y) = plot_area(p);
    let plot_width = p.width() - axis_x;
    let mut drawn = Vec::new();
    for (ci, c) in PALETTE.iter().enumerate() {
        let mut columns = vec![false; p.width() as usize];
        for y in 0..axis_y {
            for x in axis_x + 1..p.width() {
                let px = p.pixel(x, y).unwrap();
                let near = |a: u8, b: u8| a.abs_diff(b) <= 12;
                if px.alpha() == 255
                    && near(px.red(), c.0)
                    && near(px.green(), c.1)
                    && near(px.blue(), c.2)
                {
                    columns[x as usize] = true;
                }
            }
        }
        if columns.iter().filter(|c| **c).count() as u32 * 3 >= plot_width {
            drawn.push(ci);
        }
    }
    drawn
}

/// Removes the elements drawn in palette colours whose points match `pick`: what a chart
/// would look like had its series not been drawn.
fn strip(svg: &str, pick: impl Fn(&str) -> bool) -> String {
    let colours: Vec<String> = PALETTE
        .iter()
        .map(|c| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2))
        .collect();
    let mut out = String::new();
    let mut rest = svg;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let len = rest[i..].find('>').unwrap() + 1;
        let element = &rest[i..i + len];
        let coloured = colours.iter().any(|c| element.to_uppercase().contains(c));
        if !(coloured && pick(element)) {
            out.push_str(element);
        }
        rest = &rest[i + len..];
    }
    out.push_str(rest);
    out
}

#[test]
fn html_report_is_self_contained_with_charts_that_show_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = fake_results(tmp.path());
    let out = report::run(&opts(&exp, Some("lora.rank=4,8"))).unwrap();
    let html = fs::read_to_string(&out.html).unwrap();

    // Nothing is fetched: a reader offline sees the same page.
    for fetch in [
        "src=\"http",
        "href=\"http",
        "<link",
        "<script",
        "url(",
        "<img",
        "@import",
    ] {
        assert!(
            !html.contains(fetch),
            "report.html must not fetch anything ({fetch})"
        );
    }
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert!(html.trim_end().ends_with("</html>"), "{html}");
    assert!(html.contains("<title>tuna report: diag</title>"), "{html}");

    // The leaderboard, its winner row first, and the A/B table.
    let board = &html[html
        .find("<table class=\"leaderboard\">")
        .expect("a leaderboard")..];
    let board = &board[..board.find("</table>").unwrap()];
    let first_row = board
        .split("<tbody>\n")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap();
    assert!(
        first_row.starts_with("<tr class=\"winner\"><td>1 ★ winner</td><td>8</td>"),
        "{board}"
    );
    assert_eq!(board.matches("<tr class=\"winner\">").count(), 1, "{board}");
    assert_eq!(
        board.matches("<tr").count(),
        4,
        "header and one row per setting: {board}"
    );
    assert!(html.contains("<table class=\"ab\">"), "{html}");
    assert!(
        html.contains("<strong>Winner: lora.rank=8</strong>"),
        "{html}"
    );

    // Answers appear, escaped: the base model's `<b>` is text, not markup.
    assert!(
        html.contains("<td class=\"wide\">You may have Influenza.</td>"),
        "{html}"
    );
    assert!(
        html.contains("Sneezing &lt;b&gt;is&lt;/b&gt; common | often"),
        "{html}"
    );
    assert!(!html.contains("<b>is</b>"), "answers must be escaped");

    // Charts: the experiment's train and val curves and the A/B's, each inline, each drawing
    // its two settings (colours 0 and 1: ranks 4 and 8; rank 16 has no curve) as curves.
    let svgs = inline_svgs(&html);
    assert_eq!(svgs.len(), 4, "expected 4 inline charts");
    for (i, svg) in svgs.iter().enumerate() {
        // Labels are SVG text left to the viewer's fonts (not rendered here): check they exist.
        assert!(
            svg.contains("\nstep\n</text>"),
            "chart {i} lacks its x label: {svg}"
        );
        assert!(
            svg.contains(" loss\n</text>"),
            "chart {i} lacks its y label: {svg}"
        );
        let pixmap = render(svg);
        assert_eq!((pixmap.width(), pixmap.height()), (720, 360));
        assert_eq!(
            drawn_series(&pixmap),
            vec![0, 1],
            "chart {i} should show two curves"
        );
    }
}

#[test]
fn chart_check_fails_on_a_chart_without_series() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = fake_results(tmp.path());
    let out = report::run(&opts(&exp, Some("lora.rank=4,8"))).unwrap();
    let html = fs::read_to_string(&out.html).unwrap();
    let svgs = inline_svgs(&html);
    // The train chart: one polyline per run; the legend's samples have two points each.
    let train = svgs[0];
    assert_eq!(drawn_series(&render(train)), vec![0, 1]);
    let points = |e: &str| {
        e.split("points=\"").nth(1).map_or(0, |p| {
            p.split('"').next().unwrap().split_whitespace().count()
        })
    };
    // Series removed, legend kept: the legend's colours alone must not pass.
    let no_series = strip(train, |e| e.starts_with("<polyline") && points(e) > 2);
    assert!(
        no_series.contains("stroke=\"#1F77B4\" stroke-width=\"3\""),
        "the legend's colour samples stay: {no_series}"
    );
    assert!(!no_series.contains("stroke=\"#1F77B4\" stroke-width=\"2\""));
    assert!(drawn_series(&render(&no_series)).is_empty());
    // Everything coloured removed from the val chart (series, markers and legend).
    let bare = strip(svgs[1], |_| true);
    assert!(drawn_series(&render(&bare)).is_empty());
    // One setting's series removed: only the other's colour is left.
    let one = strip(train, |e| {
        e.to_uppercase().contains("#1F77B4") && points(e) > 2
    });
    assert_eq!(drawn_series(&render(&one)), vec![1]);
}

#[test]
fn several_experiments_go_to_the_parent_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = fake_results(tmp.path());
    let out_dir = tmp.path().join("results");
    // A second experiment: the same runs under another name.
    let exp2 = out_dir.join("diag2");
    fs::create_dir_all(&exp2).unwrap();
    for entry in fs::read_dir(&exp).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            let to = exp2.join(p.file_name().unwrap());
            fs::create_dir_all(&to).unwrap();
            for f in fs::read_dir(&p).unwrap() {
                let f = f.unwrap().path();
                fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    let csv_path = out_dir.join("leaderboard.csv");
    let csv = fs::read_to_string(&csv_path).unwrap();
    let extra: String = csv
        .lines()
        .skip(1)
        .map(|l| l.replace(",diag,", ",diag2,") + "\n")
        .collect();
    fs::write(&csv_path, csv + &extra).unwrap();

    let out = report::run(&Options {
        inputs: vec![exp.clone(), exp2.clone()],
        out: None,
        metric: "best_val_loss".into(),
        compare: Some("lora.rank=4,8".into()),
    })
    .unwrap();
    assert_eq!(out.markdown, out_dir.join("report.md"));
    let md = fs::read_to_string(&out.markdown).unwrap();
    assert_eq!(out.winner.as_deref(), Some("diag: lora.rank=8"), "{md}");
    assert!(
        md.contains("| 2 | diag2 | 8 | 1.2300 ± 0.0424 | 2 |"),
        "{md}"
    );
    // The A/B pools both experiments: 4 seeds a side.
    assert!(
        md.contains("| best_val_loss | 1.5200 ± 0.0231 (4) | 1.2300 ± 0.0346 (4) | -0.2900 |"),
        "{md}"
    );
    assert!(
        md.contains("diag2: no generations.jsonl for 1 done run(s)"),
        "{md}"
    );
}

#[test]
fn pruned_runs_rank_below_runs_that_went_further() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("results");
    fs::create_dir_all(out.join("es")).unwrap();
    // Rank 4 was stopped at step 10 with a lower loss than rank 8 reached at the end: it must
    // not win on a loss measured after fewer steps.
    let csv = "run_id,experiment,status,lora.rank,seed,best_val_loss,stopped_step\n\
               a,es,done,8,0,1.5,\n\
               b,es,pruned,4,0,1.2,10\n\
               c,es,pruned,2,0,1.3,30\n";
    fs::write(out.join("leaderboard.csv"), csv).unwrap();
    let r = report::run(&opts(&out.join("es"), None)).unwrap();
    assert_eq!(r.winner.as_deref(), Some("lora.rank=8"));
    let md = fs::read_to_string(&r.markdown).unwrap();
    assert!(md.contains("stopped early"), "{md}");
    let pos = |s: &str| md.find(s).unwrap();
    let table = &md[pos("## Leaderboard")..];
    // Place, then lora.rank: 8 (went to the end), 2 (stopped at 30), 4 (stopped at 10).
    assert!(table.contains("| **1 ★ winner** | **8** |"), "{table}");
    assert!(table.contains("| 2 | 2 | 1.3000 |"), "{table}");
    assert!(table.contains("| 3 | 4 | 1.2000 |"), "{table}");
}
