//! The command line: argument definitions and the dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};

use crate::config::{self, ConfigError};
use crate::sweep::{self, executor};

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
    },
    /// Prepare training data.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
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
            let runs = config::expand(&exp)?;
            print!("{}", executor::plan_table(&exp, &runs));
            Ok(ExitCode::SUCCESS)
        }
        Command::Sweep { experiment, sets } => {
            let exp = config::load_experiment(&experiment, &sets)?;
            let runs = config::expand(&exp)?;
            let Some(trainer) = crate::train::default_trainer() else {
                eprintln!(
                    "error: no trainer is available in this build yet; `tuna plan {}` shows the {} planned run(s)",
                    experiment.display(),
                    runs.len()
                );
                return Ok(ExitCode::from(2));
            };
            let cancel = install_ctrl_c();
            let outcome = sweep::run_sweep(&exp, &runs, trainer.as_ref(), &cancel, |line| {
                eprintln!("{line}")
            })?;
            eprintln!(
                "{}: {} done, {} skipped (already done), {} failed{}; leaderboard: {}",
                exp.name,
                outcome.done.len(),
                outcome.skipped.len(),
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
    }
}

/// The first Ctrl-C asks the current run to checkpoint and stop; a second one exits at once.
fn install_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting now");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: stopping after the current step (press again to exit now)");
    });
    flag
}
