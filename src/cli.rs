//! The command line: argument definitions and the dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};

use crate::config::{self, ConfigError};
use crate::sweep::{self, executor, identity};

#[derive(Parser, Debug)]
#[command(
    name = "tuna",
    version,
    about = "Fine-tune LLMs with LoRA and run hyperparameter sweeps from declarative files"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the grid of runs an experiment expands to, with each run's status; runs nothing.
    Plan {
        /// The experiment file (YAML).
        experiment: PathBuf,
        /// Override a key: `--set train.learning_rate=2e-5` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Run every run of an experiment that is not done yet; resumes where a previous sweep stopped.
    Sweep {
        experiment: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        place: Placement,
        /// Runs to train at once in this process (default: one per entry of `devices`, else 1).
        #[arg(long)]
        jobs: Option<usize>,
        /// Devices to spread the runs over, one run per device at a time: vulkan:0,vulkan:1
        /// (overrides the experiment's `devices:`).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
        /// `local` (train here) or `slurm` (submit one job array, a task per pending run).
        #[arg(long, default_value = "local")]
        executor: String,
        /// Slurm partition (overrides `slurm.partition`).
        #[arg(long)]
        partition: Option<String>,
        /// Slurm time limit per task, e.g. 2:00:00 (overrides `slurm.time`).
        #[arg(long)]
        time: Option<String>,
        /// GPUs per Slurm task (overrides `slurm.gpus_per_task`).
        #[arg(long)]
        gpus_per_task: Option<u64>,
        /// A further sbatch argument (repeatable): --sbatch-arg=--account=lab
        #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
        sbatch_args: Vec<String>,
        /// Train only this run of the grid (what each Slurm task runs).
        #[arg(long)]
        run: Option<String>,
    },
    /// Train one run: an experiment without a grid, or a run folder's `config.yaml`.
    Train {
        spec: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        place: Placement,
    },
    /// Test loss and perplexity of a model (with an optional adapter) on a data folder.
    Eval(crate::train::eval::EvalArgs),
    /// Generate text, streaming it to stdout.
    Generate(crate::generate::cli::GenerateArgs),
    /// Merge an adapter into the base weights and write a Hugging Face folder (and a GGUF file).
    Fuse {
        #[arg(long)]
        model: String,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// f32, f16 or bf16 (default: the base's own type; f16 for a dequantized base).
        #[arg(long)]
        dtype: Option<String>,
        /// Write a dense model from a quantized base (mlx-lm's flag).
        #[arg(long)]
        dequantize: bool,
        /// Also write OUT/ggml-model-TYPE.gguf for llama.cpp / Ollama: f16, q8_0 or q4_0.
        #[arg(long, value_name = "TYPE")]
        gguf: Option<String>,
    },
    /// Convert a GGUF file into a Hugging Face folder (dequantized to f32).
    Convert { gguf: PathBuf, out: PathBuf },
    /// Measure speed and memory (warmup excluded); prints one JSON line per measurement.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Compare runs: write report.md and a self-contained report.html (leaderboard by setting,
    /// effects, A/B with Welch's t-test, loss curves, base-vs-tuned answers, what is missing).
    Report {
        /// Experiment folders (results/<experiment>), an output folder, or leaderboard CSV files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Where to write (default: the experiment folder; for several, the first one's parent).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Metric to rank by (task_score and tokens_per_s: higher is better; others lower).
        #[arg(long, default_value = "best_val_loss")]
        metric: String,
        /// A/B comparison: `KEY=A,B` (e.g. lora.rank=4,8) or `RUNID,RUNID`.
        #[arg(long)]
        compare: Option<String>,
    },
    /// Prepare training data.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// LoRA training tokens/s on a model shape with random weights.
    Train(crate::bench::train::BenchTrainArgs),
    /// Causal attention paths (explicit, fused, composed, recompute): gradient error and speed on random tensors.
    Attention(crate::bench::attention::BenchAttentionArgs),
    /// Prompt and generation tokens/s.
    Generate(crate::bench::generate::BenchGenerateArgs),
    /// Seconds to read a model into host weights (best of a few).
    Load(crate::bench::load::BenchLoadArgs),
    /// Matrix-product throughput at the shapes a training step uses (peer: bench/peer_matmul.py).
    Matmul(crate::bench::matmul::BenchMatmulArgs),
    /// The host's time per tensor operation: elementwise, reduce and matmul chains, plain,
    /// autodiff-tracked, and with their backward.
    Ops(crate::bench::ops::BenchOpsArgs),
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Turn a CSV into train/valid/test JSONL (chat records with --system, else prompt/completion).
    Prepare {
        #[arg(long)]
        csv: PathBuf,
        /// Prompt text; `{column}` inserts a CSV column, e.g. "Symptoms: {text}".
        #[arg(long)]
        prompt_template: String,
        /// Answer text, e.g. "You may have {label}."
        #[arg(long)]
        completion_template: String,
        /// System message; makes the records chat (`messages`) records.
        #[arg(long)]
        system: Option<String>,
        /// train/valid/test percentages.
        #[arg(long, default_value = "80/10/10")]
        split: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Parses the process arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<ConfigError>() {
                eprintln!("error: {c}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Data {
            command:
                DataCommand::Prepare {
                    csv,
                    prompt_template,
                    completion_template,
                    system,
                    split,
                    seed,
                    out,
                },
        } => {
            let args = crate::data::prepare::PrepareArgs {
                split: crate::data::prepare::parse_split(&split)?,
                csv,
                prompt_template,
                completion_template,
                system,
                seed,
                out,
            };
            let [tr, va, te] = crate::data::prepare::prepare(&args)?;
            eprintln!(
                "wrote {} (train {tr}, valid {va}, test {te})",
                args.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { experiment, sets } => {
            let exp = config::load_experiment(&experiment, &sets)?;
            let mut runs = config::expand(&exp)?;
            let fin = identity::assign_ids(&mut runs, identity::Resolve::Offline)?;
            print!("{}", executor::plan_table(&exp, &runs));
            if !fin {
                println!(
                    "note: the model is not downloaded yet; run ids are final once `tuna sweep` has fetched it"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train { spec, sets, place } => {
            let exp = config::load_experiment(&spec, &place.with(sets)?)?;
            let mut runs = config::expand(&exp)?;
            identity::assign_ids(&mut runs, identity::Resolve::Fetch)?;
            if runs.len() != 1 {
                anyhow::bail!(
                    "{} expands to {} runs; `tuna train` trains one (use `tuna sweep {}`)",
                    spec.display(),
                    runs.len(),
                    spec.display()
                );
            }
            sweep_runs(&exp, &runs, &sweep_options(&exp, Some(1), Vec::new())?)
        }
        Command::Eval(args) => {
            crate::train::eval::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(args) => {
            crate::generate::cli::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fuse {
            model,
            adapter,
            out,
            dtype,
            dequantize,
            gguf,
        } => {
            use crate::formats::safetensors::FloatType;
            let dtype = match dtype.as_deref() {
                None => None,
                Some("f32") => Some(FloatType::F32),
                Some("f16") => Some(FloatType::F16),
                Some("bf16") => Some(FloatType::BF16),
                Some(other) => anyhow::bail!("--dtype `{other}`: use f32, f16 or bf16"),
            };
            let base = crate::source::base::load_base(&model)?;
            let gguf = gguf
                .as_deref()
                .map(crate::export::gguf::GgufType::parse)
                .transpose()?;
            let opts = crate::export::fuse::FuseOptions {
                dtype,
                dequantize,
                gguf,
            };
            let ty = crate::export::fuse::fuse(&base, &adapter, &out, opts)?;
            eprintln!("wrote {} ({})", out.display(), ty.torch_name());
            if let Some(g) = gguf {
                let p = crate::export::fuse::gguf_path(&out, g);
                eprintln!("wrote {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Load(a),
        } => {
            println!("{}", crate::bench::load::bench_load(&a)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Train(a),
        } => {
            println!("{}", crate::bench::train::bench_train(&a)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Attention(a),
        } => {
            println!("{}", crate::bench::attention::bench_attention(&a)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Matmul(a),
        } => {
            println!("{}", crate::bench::matmul::bench_matmul(&a)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Ops(a),
        } => {
            println!("{}", crate::bench::ops::bench_ops(&a)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Generate(a),
        } => {
            println!("{}", crate::bench::generate::bench_generate(&a)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert { gguf, out } => {
            crate::export::convert::convert_gguf_to_hf(&gguf, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            inputs,
            out,
            metric,
            compare,
        } => {
            let o = crate::report::run(&crate::report::Options {
                inputs,
                out,
                metric,
                compare,
            })?;
            print!("{}", o.summary);
            Ok(ExitCode::SUCCESS)
        }
        Command::Sweep {
            experiment,
            sets,
            place,
            jobs,
            devices,
            executor,
            partition,
            time,
            gpus_per_task,
            sbatch_args,
            run,
        } => {
            let sets = place.with(sets)?;
            let exp = config::load_experiment(&experiment, &sets)?;
            let mut runs = config::expand(&exp)?;
            identity::assign_ids(&mut runs, identity::Resolve::Fetch)?;
            if let Some(id) = run {
                runs.retain(|r| r.id == id);
                if runs.is_empty() {
                    anyhow::bail!(
                        "run `{id}` is not in {}'s grid (`tuna plan {}` lists its runs)",
                        experiment.display(),
                        experiment.display()
                    );
                }
            }
            match executor.as_str() {
                "local" => {
                    let opts = sweep_options(&exp, jobs, devices)?;
                    sweep_runs(&exp, &runs, &opts)
                }
                "slurm" => {
                    let opts = sweep::slurm::SlurmOptions::from_experiment(
                        &exp.base,
                        partition,
                        time,
                        gpus_per_task,
                        sbatch_args,
                    )?;
                    let s = sweep::slurm::submit(&exp, &runs, &experiment, &sets, &opts)?;
                    match &s.job {
                        Some(job) => eprintln!(
                            "{}: submitted Slurm job {job}: {} task(s), one per run ({}); {} done, {} still in Slurm; `tuna plan {}` shows progress",
                            exp.name,
                            s.runs.len(),
                            s.script
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                            s.finished.len(),
                            s.in_slurm.len(),
                            experiment.display()
                        ),
                        None => eprintln!(
                            "{}: nothing to submit: {} done, {} still in Slurm",
                            exp.name,
                            s.finished.len(),
                            s.in_slurm.len()
                        ),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => anyhow::bail!("--executor `{other}`: use local or slurm"),
            }
        }
    }
}

/// `--device` and `--dtype` of `tuna train` and `tuna sweep`, as `eval` and `generate` have
/// them: shorthands for `--set device=…` and `--set dtype=…` (so they are checked, and recorded
/// in each run's config, like any key).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Placement {
    /// auto, cpu, wgpu, vulkan or metal (the spec's `device:`).
    #[arg(long)]
    pub device: Option<String>,
    /// auto, f32, f16 or bf16 (the spec's `dtype:`).
    #[arg(long)]
    pub dtype: Option<String>,
}

impl Placement {
    /// `sets` with the flags appended; a bad value is reported as the flag the user typed.
    fn with(&self, mut sets: Vec<String>) -> anyhow::Result<Vec<String>> {
        for (flag, key, value) in [
            ("--device", "device", &self.device),
            ("--dtype", "dtype", &self.dtype),
        ] {
            if let Some(v) = value {
                let set = format!("{key}={v}");
                config::layer::parse_set(&set)
                    .map_err(|e| anyhow::anyhow!("{flag} `{v}`: {}", e.message))?;
                sets.push(set);
            }
        }
        Ok(sets)
    }
}

/// `--jobs` and `--devices` (else the experiment's `devices:`), each device checked.
fn sweep_options(
    exp: &config::Experiment,
    jobs: Option<usize>,
    devices: Vec<String>,
) -> anyhow::Result<executor::SweepOptions> {
    let devices = if devices.is_empty() {
        config::keys::Resolved(&exp.base)
            .strings("devices")
            .unwrap_or_default()
    } else {
        devices
    };
    for d in &devices {
        let (name, _) = crate::model::device::split_index(d)?;
        name.parse::<crate::model::device::DeviceChoice>()
            .map_err(|e| anyhow::anyhow!("device `{d}` in devices: {e}"))?;
    }
    if jobs == Some(0) {
        anyhow::bail!("--jobs 0: use 1 or more");
    }
    Ok(executor::SweepOptions {
        jobs: jobs.unwrap_or(devices.len().max(1)),
        devices,
        ..Default::default()
    })
}

/// Runs planned runs with the real trainer and prints the outcome.
fn sweep_runs(
    exp: &config::Experiment,
    runs: &[config::RunPlan],
    opts: &executor::SweepOptions,
) -> anyhow::Result<ExitCode> {
    let Some(trainer) = crate::train::default_trainer() else {
        anyhow::bail!("no trainer is available in this build");
    };
    let cancel = install_ctrl_c();
    let outcome = executor::run_sweep_with(exp, runs, trainer.as_ref(), &cancel, opts, |line| {
        eprintln!("{line}")
    })?;
    eprintln!(
        "{}: {} done, {} skipped (already done), {} by other processes, {} failed{}; leaderboard: {}",
        exp.name,
        outcome.done.len(),
        outcome.skipped.len(),
        outcome.elsewhere.len(),
        outcome.failed.len(),
        if outcome.interrupted {
            ", interrupted"
        } else {
            ""
        },
        executor::leaderboard_of(&executor::output_dir(&exp.base))
            .path
            .display()
    );
    for (id, msg) in &outcome.failed {
        eprintln!("  failed {id}: {msg}");
    }
    Ok(if outcome.failed.is_empty() && !outcome.interrupted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The first Ctrl-C (or SIGTERM) asks the current run to checkpoint and stop; a second one
/// marks the run interrupted and exits at once.
fn install_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // With ctrlc's `termination` feature this also catches SIGTERM (a scheduler's kill, `kill`)
    // and SIGHUP, which then checkpoint the same way.
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: marking the run interrupted and exiting now");
            crate::sweep::executor::abort_current_run();
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt (Ctrl-C or SIGTERM): stopping after the current step (press Ctrl-C again to exit now)"
        );
    });
    flag
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tuna bench train` refuses a step count and a sampling rate it cannot run, by name.
    #[test]
    fn bench_train_refuses_zero_steps_and_a_zero_sampling_rate() {
        for (flag, value) in [
            ("--steps", "0"),
            ("--host-profile-hz", "0"),
            ("--host-profile-hz", "1000000"),
        ] {
            let err = Cli::try_parse_from(["tuna", "bench", "train", flag, value]).unwrap_err();
            assert!(err.to_string().contains(flag), "{flag} {value}: {err}");
        }
        let ok = Cli::try_parse_from([
            "tuna",
            "bench",
            "train",
            "--steps",
            "2",
            "--host-profile-hz",
            "4999",
        ]);
        assert!(ok.is_ok(), "{:?}", ok.err());
    }
}
