//! Redis members for the chaos run: `redis-server` processes the nemesis can
//! kill, restart (as an empty master or as a replica), stop and continue,
//! and put to sleep (`DEBUG SLEEP`). Blocking calls: used from the nemesis
//! thread.

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::{free_port, query, Reply};

/// One member: a port and a directory kept across restarts, and the process
/// of the moment.
pub struct Member {
    pub name: String,
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// `run_id` of the current process (new at every start).
    pub run_id: String,
    /// How many processes this member has had (1 after the first start).
    pub starts: u32,
}

impl Member {
    /// Starts a member, a replica of `127.0.0.1:PORT` if `replica_of`.
    pub fn start(name: &str, replica_of: Option<u16>) -> io::Result<Member> {
        let mut member = Member {
            name: name.to_string(),
            port: free_port(),
            dir: TempDir::new().expect("temp dir for redis"),
            child: None,
            run_id: String::new(),
            starts: 0,
        };
        member.spawn(replica_of)?;
        Ok(member)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Starts the process (without persistence: it comes up empty) and waits
    /// for PING and its `run_id`.
    fn spawn(&mut self, replica_of: Option<u16>) -> io::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(self.dir.path());
        if let Some(primary) = replica_of {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(info) = query(self.port, &["INFO", "server"], Duration::from_millis(500)) {
                if let Some(run_id) = info_field(&info, "run_id") {
                    self.run_id = run_id;
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(io::Error::other(format!(
                    "redis-server {} exited with {status}:\n{}",
                    self.port,
                    self.log_tail(20)
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "redis-server {} did not answer within 10 s",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process (if any) and starts a new one: a master, or a
    /// replica of `replica_of`. Persistence is off, but a member that was
    /// a replica keeps the RDB file of its last full sync in its directory
    /// and loads it at start: a master started from it carries the old
    /// primary's replication id as its `master_replid2`, so it looks like a
    /// promoted successor. `empty` deletes the RDB files first, so the
    /// process starts empty with a fresh replication id and no history.
    pub fn restart(&mut self, replica_of: Option<u16>, empty: bool) -> io::Result<()> {
        self.kill9();
        if empty {
            for entry in std::fs::read_dir(self.dir.path())?.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().ends_with(".rdb") {
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        self.spawn(replica_of)
    }

    pub fn cmd(&self, args: &[&str], limit: Duration) -> io::Result<Reply> {
        query(self.port, args, limit)
    }

    /// `REPLICAOF NO ONE`.
    pub fn promote(&self) -> io::Result<()> {
        expect_ok(self.cmd(&["REPLICAOF", "NO", "ONE"], Duration::from_secs(5))?)
    }

    /// `REPLICAOF 127.0.0.1 PORT`.
    pub fn follow(&self, primary: u16) -> io::Result<()> {
        expect_ok(self.cmd(
            &["REPLICAOF", "127.0.0.1", &primary.to_string()],
            Duration::from_secs(5),
        )?)
    }

    /// Waits up to `limit` for `master_link_status:up` with `primary`.
    pub fn wait_link_up(&self, primary: u16, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(info) = self.cmd(&["INFO", "replication"], Duration::from_secs(1)) {
                last = info.text();
                if last.contains("master_link_status:up")
                    && last.contains(&format!("master_port:{primary}"))
                {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::other(format!(
            "{} did not sync with {primary} within {limit:?}: {last}",
            self.name
        )))
    }
}

pub fn signal_pid(pid: u32, signal: &str) -> io::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("kill -{signal} {pid}: {status}")))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // A stopped process still dies of SIGKILL, but continue it anyway.
            let _ = signal_pid(pid, "CONT");
        }
        self.kill9();
    }
}

fn expect_ok(reply: Reply) -> io::Result<()> {
    match reply {
        Reply::Simple(ok) if ok == "OK" => Ok(()),
        other => Err(io::Error::other(format!("expected OK, got {other:?}"))),
    }
}

/// A `field:value` line of an `INFO` reply.
pub fn info_field(info: &Reply, field: &str) -> Option<String> {
    let Reply::Bulk(Some(_)) = info else {
        return None;
    };
    let prefix = format!("{field}:");
    info.text().lines().find_map(|l| {
        l.strip_prefix(prefix.as_str())
            .map(|v| v.trim().to_string())
    })
}
