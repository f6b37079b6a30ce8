//! A `hookd` child process whose every wait is bounded: a stop that does not finish fails the
//! test with the daemon's thread stacks and log tail instead of holding the test run for ever,
//! and a test that panics does not leave its daemon running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a stopped daemon may take to exit: its 5 s grace and every bounded stop step
/// (`hookd::shutdown`), a little under `shutdown.deadline_ms` (30 s), after which the daemon
/// would exit by itself, so that a stuck stop shows its stacks here.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(25);

pub struct Hookd {
    child: Child,
    log: PathBuf,
}

impl Hookd {
    pub fn spawn(config: &Path, log: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_hookd"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", std::env::var("HOOKD_E2E_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("hookd binary starts");
        Self { child, log: log.to_path_buf() }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and the exit reaped.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
        self.wait_exit("SIGKILL");
    }

    /// SIGTERM, and the exit status once the graceful stop finished.
    pub fn terminate(&mut self) -> ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit("SIGTERM")
    }

    /// Waits up to [`EXIT_TIMEOUT`] for the exit; past it prints every thread's stack (gdb,
    /// when installed) and the log's tail, kills the process and panics. On a multi-thread
    /// runtime the wait hands the worker's queued tasks (the test's HTTP receiver, which the
    /// stopping daemon may still be waiting on) to another worker first.
    pub fn wait_exit(&mut self, after: &str) -> ExitStatus {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| self.poll_exit(after)),
            _ => self.poll_exit(after),
        }
    }

    fn poll_exit(&mut self, after: &str) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                println!("hookd exited {:?} after {after} ({status})", start.elapsed());
                return status;
            }
            if start.elapsed() > EXIT_TIMEOUT {
                let stacks = thread_stacks(self.child.id());
                let _ = self.child.kill();
                let _ = self.child.wait();
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "hookd did not exit within {EXIT_TIMEOUT:?} of {after}; killed.\nthreads:\n{stacks}\nlog tail (newest first):\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Hookd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every thread's backtrace of process `pid`, by gdb in batch mode (bounded by `timeout`).
fn thread_stacks(pid: u32) -> String {
    let out = Command::new("timeout")
        .args(["60", "gdb", "-batch", "-nx", "-p", &pid.to_string(), "-ex", "thread apply all bt 30"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("(no stacks: gdb not run: {e})"),
    }
}
