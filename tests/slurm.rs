//! `tuna sweep --executor slurm` against a real Slurm: a `munged`, `slurmctld` and `slurmd` on
//! this machine, configured in a temporary folder, started here and stopped at the end. Slurm
//! comes from Debian's `slurm-wlm` (`tests/setup.sh` installs it).

use crate::common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::reference_dir;

/// A one-node Slurm cluster in a temporary folder; stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_ok(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

impl Cluster {
    fn start() -> Self {
        for bin in [
            "munged",
            "slurmctld",
            "slurmd",
            "sbatch",
            "squeue",
            "scancel",
            "sinfo",
        ] {
            assert!(
                have(bin),
                "`{bin}` is not installed: run tests/setup.sh (it installs Debian's slurm-wlm)"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["state", "spool"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let host = String::from_utf8(run_ok(Command::new("hostname").arg("-s")).stdout)
            .unwrap()
            .trim()
            .to_string();
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let p = |name: &str| d.join(name).display().to_string();
        let conf = d.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=tunatest\nSlurmctldHost={host}\nAuthType=auth/munge\nCredType=cred/munge\n\
                 AuthInfo=socket={sock}\nSlurmUser=root\nSlurmdUser=root\n\
                 StateSaveLocation={state}\nSlurmdSpoolDir={spool}\n\
                 SlurmctldPidFile={cpid}\nSlurmdPidFile={dpid}\n\
                 SlurmctldPort={p1}\nSlurmdPort={p2}\n\
                 SlurmctldLogFile={clog}\nSlurmdLogFile={dlog}\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n\
                 SchedulerType=sched/builtin\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
                 ReturnToService=2\nJobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\nKillWait=30\n\
                 NodeName={host} CPUs={cpus} State=UNKNOWN\n\
                 PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
                sock = p("munge.sock"),
                state = p("state"),
                spool = p("spool"),
                cpid = p("slurmctld.pid"),
                dpid = p("slurmd.pid"),
                p1 = free_port(),
                p2 = free_port(),
                clog = p("slurmctld.log"),
                dlog = p("slurmd.log"),
            ),
        )
        .unwrap();
        let key: Vec<u8> = (0..1024u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(d.join("munge.key"), key).unwrap();
        run_ok(Command::new("chmod").args(["600", &p("munge.key")]));
        run_ok(Command::new("munged").args([
            "--force",
            &format!("--socket={}", p("munge.sock")),
            &format!("--key-file={}", p("munge.key")),
            &format!("--pid-file={}", p("munge.pid")),
            &format!("--log-file={}", p("munge.log")),
            &format!("--seed-file={}", p("munge.seed")),
        ]));
        run_ok(Command::new("slurmctld").arg("-f").arg(&conf));
        run_ok(Command::new("slurmd").arg("-f").arg(&conf));
        let c = Cluster { dir, conf };
        let t0 = Instant::now();
        loop {
            let o = c.cmd("sinfo").args(["-h", "-o", "%T"]).output().unwrap();
            if String::from_utf8_lossy(&o.stdout).contains("idle") {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the Slurm node never came up: {}",
                std::fs::read_to_string(c.dir.path().join("slurmctld.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// A command that talks to this cluster.
    fn cmd(&self, bin: &str) -> Command {
        let mut c = Command::new(bin);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.cmd("scancel").args(["--full", "-u", "root"]).output();
        for pid in ["slurmd.pid", "slurmctld.pid", "munge.pid"] {
            if let Ok(p) = std::fs::read_to_string(self.dir.path().join(pid)) {
                let _ = Command::new("kill").arg(p.trim()).output();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn experiment(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        "name: slurm\nmodel: {}\ndata: {}\ndevice: cpu\n\
         train:\n  iters: 160\n  batch_size: 2\n  max_seq_length: 96\n  \
         steps_per_report: 50\n  steps_per_eval: 100\n  val_batches: 2\n  save_every: 5\n\
         lora:\n  num_layers: -1\nslurm:\n  time: \"10:00\"\noutput:\n  dir: {}\n\
         grid:\n  train.learning_rate: [1e-3, 5e-3]\n  lora.rank: [2, 4]\n",
        reference_dir().join("tiny-llama").display(),
        root.join("experiments/data/diagnosis").display(),
        dir.join("out").display(),
    );
    let p = dir.join("exp.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn tuna(c: &Cluster, args: &[&str]) -> (String, String) {
    let o = c
        .cmd(env!("CARGO_BIN_EXE_tuna"))
        .args(args)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "tuna {args:?}: {out}{err}");
    (out, err)
}

fn job_of(err: &str) -> String {
    err.split("submitted Slurm job ")
        .nth(1)
        .unwrap_or_else(|| panic!("no job id in: {err}"))
        .split(':')
        .next()
        .unwrap()
        .to_string()
}

/// The run folders' states, by run id.
fn states(exp_dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(exp_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("status.json").exists())
        .map(|e| {
            let s: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(e.path().join("status.json")).unwrap(),
            )
            .unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_sweep_runs_as_a_job_array_and_resumes_after_scancel() {
    let c = Cluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let spec = experiment(tmp.path());
    let spec_s = spec.to_str().unwrap();
    let exp_dir = tmp.path().join("out/slurm");

    let (_, err) = tuna(&c, &["sweep", spec_s, "--executor", "slurm"]);
    assert!(err.contains("4 task(s)"), "{err}");
    let job = job_of(&err);
    let script = std::fs::read_dir(exp_dir.join("slurm"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".sh"))
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(
        text.contains("#SBATCH --array=0-3") && text.contains("#SBATCH --time=10:00"),
        "{text}"
    );
    let (plan, _) = tuna(&c, &["plan", spec_s]);
    assert!(
        plan.contains(&format!("slurm {job}_")) || plan.contains("running"),
        "{plan}"
    );

    // Cancel the whole array once a run has a checkpoint: running tasks are stopped with
    // SIGTERM (they checkpoint and say `interrupted`), pending ones never start.
    wait_until("a checkpoint", 240, || {
        std::fs::read_dir(&exp_dir).unwrap().flatten().any(|e| {
            std::fs::read_to_string(e.path().join("checkpoint/state.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|v| v["step"].as_u64().unwrap_or(0) >= 10)
        })
    });
    run_ok(c.cmd("scancel").arg(&job));
    wait_until("the array to leave the queue", 90, || {
        let o = c.cmd("squeue").args(["-h", "-j", &job]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().is_empty()
    });
    let after_cancel = states(&exp_dir);
    let done_first = after_cancel.iter().filter(|(_, s)| s == "done").count();
    assert!(done_first < 4, "cancelled too late: {after_cancel:?}");
    let interrupted: Vec<String> = after_cancel
        .iter()
        .filter(|(_, s)| s == "interrupted")
        .map(|(id, _)| id.clone())
        .collect();
    assert!(!interrupted.is_empty(), "{after_cancel:?}");
    let (plan, _) = tuna(&c, &["plan", spec_s]);
    if after_cancel.iter().any(|(_, s)| s == "queued") {
        assert!(plan.contains("gone: submit again"), "{plan}");
    }

    // A second submit resumes what was not finished.
    let (_, err) = tuna(&c, &["sweep", spec_s, "--executor", "slurm"]);
    assert!(
        err.contains(&format!("{} task(s)", 4 - done_first)),
        "{err}"
    );
    let job2 = job_of(&err);
    wait_until("every run done", 300, || {
        states(&exp_dir).iter().filter(|(_, s)| s == "done").count() == 4
    });
    // The interrupted runs resumed from their checkpoints in the second job's tasks.
    let logs: String = std::fs::read_dir(exp_dir.join("slurm"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{job2}_"))
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    for id in &interrupted {
        assert!(
            logs.contains(&format!("resuming run {id}")),
            "{id} did not resume:\n{logs}"
        );
    }
    let table = tuna::sweep::Leaderboard::new(&tmp.path().join("out/leaderboard.csv"))
        .read()
        .unwrap();
    assert_eq!(table.rows.len(), 4);
    assert!(
        table.rows.iter().all(|r| r["status"] == "done"),
        "{:?}",
        table.rows
    );
    assert!(
        table.rows.iter().all(|r| !r["lora.rank"].is_empty()),
        "varied keys kept"
    );

    let (_, err) = tuna(&c, &["sweep", spec_s, "--executor", "slurm"]);
    assert!(err.contains("nothing to submit: 4 done"), "{err}");
}
