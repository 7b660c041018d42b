//! A report as a list of blocks, written out as Markdown or as one self-contained HTML page
//! (inline CSS and SVG, nothing fetched).

/// One piece of a report.
#[derive(Debug, Clone)]
pub enum Block {
    Heading(u8, String),
    Para(String),
    List(Vec<String>),
    Table(Table),
    /// An SVG chart: a file name for the Markdown version (written next to report.md) and the
    /// SVG text itself (inlined in HTML).
    Chart {
        name: String,
        title: String,
        svg: String,
    },
    /// Preformatted text (answers keep their line breaks).
    Quote(String),
}

#[derive(Debug, Clone, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Rows shown highlighted (the winner).
    pub highlight: Vec<usize>,
    /// Columns holding long text (answers), wrapped instead of kept on one line.
    pub wide: Vec<usize>,
    pub class: &'static str,
}

/// Folder (relative to report.md) that chart SVG files go to.
pub const CHART_DIR: &str = "report_charts";

pub fn markdown(title: &str, blocks: &[Block]) -> String {
    let mut s = format!("# {title}\n\n");
    for b in blocks {
        match b {
            Block::Heading(level, t) => {
                s.push_str(&format!("{} {t}\n\n", "#".repeat(*level as usize)))
            }
            Block::Para(t) => s.push_str(&format!("{t}\n\n")),
            Block::List(items) => {
                for i in items {
                    s.push_str(&format!("- {}\n", i.replace('\n', " ")));
                }
                s.push('\n');
            }
            Block::Table(t) => {
                let cell = |c: &str| {
                    md_escape(c)
                        .replace('|', "\\|")
                        .replace("\r\n", "<br>")
                        .replace('\n', "<br>")
                };
                s.push_str(&format!(
                    "| {} |\n",
                    t.header
                        .iter()
                        .map(|c| cell(c))
                        .collect::<Vec<_>>()
                        .join(" | ")
                ));
                s.push_str(&format!("|{}\n", " --- |".repeat(t.header.len())));
                for (i, r) in t.rows.iter().enumerate() {
                    let cells: Vec<String> = r
                        .iter()
                        .map(|c| {
                            let c = cell(c);
                            if t.highlight.contains(&i) && !c.is_empty() {
                                format!("**{c}**")
                            } else {
                                c
                            }
                        })
                        .collect();
                    s.push_str(&format!("| {} |\n", cells.join(" | ")));
                }
                s.push('\n');
            }
            Block::Chart { name, title, .. } => {
                s.push_str(&format!("![{title}]({CHART_DIR}/{name}.svg)\n\n"))
            }
            Block::Quote(t) => {
                for line in t.lines() {
                    s.push_str(&format!("> {}\n", md_escape(line)));
                }
                s.push('\n');
            }
        }
    }
    s
}

/// Keeps text in Markdown from being read as HTML.
fn md_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Minimal inline Markdown for HTML: `**bold**` and `` `code` `` (text is escaped first).
fn inline(s: &str) -> String {
    let e = escape(s);
    let mut out = String::new();
    let (mut bold, mut code) = (false, false);
    let mut chars = e.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '`' {
            out.push_str(if code { "</code>" } else { "<code>" });
            code = !code;
        } else if c == '*' && chars.peek() == Some(&'*') && !code {
            chars.next();
            out.push_str(if bold { "</strong>" } else { "<strong>" });
            bold = !bold;
        } else {
            out.push(c);
        }
    }
    if code {
        out.push_str("</code>");
    }
    if bold {
        out.push_str("</strong>");
    }
    out
}

const CSS: &str = r#"
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1f2328;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:1.7em;border-bottom:2px solid #e3e6ea;padding-bottom:.3em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #e3e6ea;padding-bottom:.2em}
h3{font-size:1.05em;margin-top:1.3em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.88em;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #d6dae0;padding:4px 8px;text-align:left;vertical-align:top;white-space:nowrap}
th{background:#eef1f5;font-weight:600}
tr:nth-child(even) td{background:#fafbfc}
tr.winner td{background:#e6f6e6;font-weight:600}
td.wide{white-space:pre-wrap;min-width:260px;max-width:520px}
code{background:#eef1f5;padding:1px 4px;border-radius:3px;font-size:.92em}
figure{margin:.8em 0 1.4em}
figure svg{max-width:100%;height:auto;border:1px solid #e3e6ea;border-radius:4px}
figcaption{font-size:.85em;color:#57606a}
blockquote{margin:.4em 0 1em;padding:.4em .9em;border-left:4px solid #d0d7de;background:#f6f8fa;white-space:pre-wrap}
ul{padding-left:1.3em}
"#;

pub fn html(title: &str, blocks: &[Block]) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    for b in blocks {
        match b {
            Block::Heading(level, t) => {
                let l = (*level).clamp(2, 6);
                s.push_str(&format!("<h{l}>{}</h{l}>\n", inline(t)));
            }
            Block::Para(t) => s.push_str(&format!("<p>{}</p>\n", inline(t))),
            Block::List(items) => {
                s.push_str("<ul>\n");
                for i in items {
                    s.push_str(&format!("<li>{}</li>\n", inline(i)));
                }
                s.push_str("</ul>\n");
            }
            Block::Table(t) => {
                if t.class.is_empty() {
                    s.push_str("<table>\n<thead><tr>");
                } else {
                    s.push_str(&format!("<table class=\"{}\">\n<thead><tr>", t.class));
                }
                for h in &t.header {
                    s.push_str(&format!("<th>{}</th>", inline(h)));
                }
                s.push_str("</tr></thead>\n<tbody>\n");
                for (i, r) in t.rows.iter().enumerate() {
                    if t.highlight.contains(&i) {
                        s.push_str("<tr class=\"winner\">");
                    } else {
                        s.push_str("<tr>");
                    }
                    for (j, c) in r.iter().enumerate() {
                        if t.wide.contains(&j) {
                            s.push_str(&format!("<td class=\"wide\">{}</td>", escape(c)));
                        } else {
                            s.push_str(&format!("<td>{}</td>", inline(c)));
                        }
                    }
                    s.push_str("</tr>\n");
                }
                s.push_str("</tbody>\n</table>\n");
            }
            Block::Chart { title, svg, .. } => {
                // Drop any XML prolog so the SVG can sit inside HTML.
                let body = match svg.find("<svg") {
                    Some(i) => &svg[i..],
                    None => svg.as_str(),
                };
                s.push_str(&format!(
                    "<figure>\n{body}\n<figcaption>{}</figcaption>\n</figure>\n",
                    escape(title)
                ));
            }
            Block::Quote(t) => s.push_str(&format!("<blockquote>{}</blockquote>\n", escape(t))),
        }
    }
    s.push_str("</main>\n</body>\n</html>\n");
    s
}
