//! Scenarios 1 and 2: the login storm (N clients connect and log in: logins
//! per second, failures, latency, server CPU per login) and idle memory
//! (server RSS before and after N idle connected clients: KiB per
//! connection). Idle memory can spread its clients over several generator
//! processes (one process may hold at most about 20,000 sockets here).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::conn::{Ignore, close_all};
use super::fleet::{Common, login_many, logins_json, probe};
use super::stats::{self, Window};

pub struct StormOptions {
    pub clients: usize,
    pub first_user: usize,
    /// Give up on logins not done by then.
    pub deadline: Duration,
    /// Keep the sessions this long after the last login (they answer pings
    /// and acks meanwhile), then close them.
    pub hold: Duration,
}

pub async fn login_storm(common: &Common, o: &StormOptions) -> serde_json::Value {
    let window = Window::start(common.server_pid);
    let mut l = login_many(
        common,
        o.first_user..o.first_user + o.clients,
        Arc::new(Ignore),
        o.deadline,
    )
    .await;
    let usage = window.finish();
    let ok = l.conns.len();
    let wall = l.wall.as_secs_f64();
    let server = match l.conns.first() {
        Some(c) => probe(c, &common.target.domain).await,
        None => serde_json::Value::Null,
    };
    let logins = logins_json(&mut l);
    if !o.hold.is_zero() {
        tokio::time::sleep(o.hold).await;
    }
    let dropped = l.conns.iter().filter(|c| c.is_closed()).count();
    let conns = std::mem::take(&mut l.conns);
    close_all(conns, Duration::from_secs(10)).await;
    let server_cpu = usage.server.map(|u| u.cpu_secs);
    json!({
        "scenario": "login",
        "clients": o.clients,
        "concurrency": common.concurrency,
        "logins": logins,
        "logins_per_s": if wall > 0.0 { ok as f64 / wall } else { 0.0 },
        "server_cpu_s": server_cpu,
        "server_cpu_ms_per_login": server_cpu.filter(|_| ok > 0).map(|c| c * 1000.0 / ok as f64),
        "server_cores": usage.server.map(|u| u.cores),
        "cpu_busy": usage.cpu_busy,
        "generator_cpu_s": usage.generator.cpu_secs,
        "generator_cores": usage.generator.cores,
        "dropped_while_held": dropped,
        "server": server,
    })
}

pub struct IdleOptions {
    pub clients: usize,
    pub first_user: usize,
    /// Seconds to let the server settle before reading its RSS.
    pub settle: Duration,
    pub deadline: Duration,
    /// Clients per generator process; more clients use worker processes.
    pub per_process: usize,
}

/// How to start a worker process holding users `[from, from + count)`.
pub struct WorkerLauncher {
    pub exe: PathBuf,
    /// Arguments before the range (the worker subcommand and connection
    /// options); `--from N --count M` is appended.
    pub args: Vec<String>,
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Worker {
    fn start(l: &WorkerLauncher, from: usize, count: usize) -> std::io::Result<Worker> {
        let mut child = Command::new(&l.exe)
            .args(&l.args)
            .args(["--from", &from.to_string(), "--count", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let stdin = child.stdin.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Worker {
            child,
            stdin,
            lines: rx,
        })
    }

    /// The next JSON line from the worker.
    fn next(&self, timeout: Duration) -> Option<serde_json::Value> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                return Some(v);
            }
        }
    }

    fn command(&mut self, cmd: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{cmd}");
            let _ = s.flush();
        }
    }

    /// Wait for the exit; kill it (by its PID) if it does not exit in time.
    fn finish(mut self, timeout: Duration) {
        drop(self.stdin.take());
        let end = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

fn server_rss(pid: u32) -> Option<u64> {
    stats::sample(Some(pid)).ok().map(|s| s.rss_kib)
}

/// Read the server's RSS once a second for `settle`; the last reading.
async fn settle_rss(pid: u32, settle: Duration) -> Option<u64> {
    let end = Instant::now() + settle;
    let mut last = server_rss(pid);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        last = server_rss(pid).or(last);
    }
    last
}

pub async fn idle_memory(
    common: &Common,
    o: &IdleOptions,
    launcher: Option<&WorkerLauncher>,
) -> serde_json::Value {
    let Some(pid) = common.server_pid else {
        return json!({"scenario": "idle", "error": "idle memory needs --server-pid"});
    };
    // The baseline: a server that has started and has nothing to do.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server_rss(pid);
    let window = Window::start(Some(pid));
    let per = o.per_process.max(1);
    let procs = o.clients.div_ceil(per);
    let mut failures = serde_json::Map::new();
    let mut generator_cpu = 0.0;
    let mut login_wall = 0.0f64;
    let mut worker_info = Vec::new();
    let mut connected = 0usize;
    let mut first_error = serde_json::Value::Null;
    let mut server_info = serde_json::Value::Null;
    let mut local = None;
    let mut workers = Vec::new();
    if procs <= 1 || launcher.is_none() {
        let mut l = login_many(
            common,
            o.first_user..o.first_user + o.clients,
            Arc::new(Ignore),
            o.deadline,
        )
        .await;
        connected = l.conns.len();
        login_wall = l.wall.as_secs_f64();
        let summary = logins_json(&mut l);
        failures = summary["failures"].as_object().cloned().unwrap_or_default();
        first_error = summary["first_error"].clone();
        worker_info.push(summary);
        local = Some(l);
    } else if let Some(launcher) = launcher {
        let started = Instant::now();
        for p in 0..procs {
            let from = o.first_user + p * per;
            let count = per.min(o.first_user + o.clients - from);
            match Worker::start(launcher, from, count) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    first_error = json!(format!("cannot start a worker: {e}"));
                }
            }
        }
        for w in &workers {
            match w.next(o.deadline + Duration::from_secs(10)) {
                Some(v) => {
                    connected += v["ok"].as_u64().unwrap_or(0) as usize;
                    generator_cpu += v["generator_cpu_s"].as_f64().unwrap_or(0.0);
                    if let Some(f) = v["failures"].as_object() {
                        for (k, n) in f {
                            let old = failures.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                            failures.insert(k.clone(), json!(old + n.as_u64().unwrap_or(0)));
                        }
                    }
                    if first_error.is_null() && !v["first_error"].is_null() {
                        first_error = v["first_error"].clone();
                    }
                    worker_info.push(v);
                }
                None => {
                    first_error = json!("a worker did not report in time");
                }
            }
        }
        login_wall = started.elapsed().as_secs_f64();
    }
    let login_usage = window.finish();
    let after = settle_rss(pid, o.settle).await;
    // Who is still connected after settling.
    let alive = if let Some(l) = &local {
        if let Some(c) = l.conns.first() {
            server_info = probe(c, &common.target.domain).await;
        }
        l.conns.iter().filter(|c| !c.is_closed()).count()
    } else {
        let mut n = 0;
        for w in workers.iter_mut() {
            w.command("count");
        }
        for w in &workers {
            if let Some(v) = w.next(Duration::from_secs(30)) {
                n += v["alive"].as_u64().unwrap_or(0) as usize;
                if server_info.is_null() && !v["server"].is_null() {
                    server_info = v["server"].clone();
                }
            }
        }
        n
    };
    let idle_usage = Window::start(Some(pid));
    // Idle cost: the server's CPU while the clients sit there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu = idle_usage.finish();
    // Release everything and see whether the memory comes back.
    if let Some(mut l) = local {
        close_all(std::mem::take(&mut l.conns), Duration::from_secs(10)).await;
    }
    for w in workers.iter_mut() {
        w.command("close");
    }
    for w in workers {
        if let Some(v) = w.next(Duration::from_secs(30)) {
            generator_cpu += v["generator_cpu_s"].as_f64().unwrap_or(0.0);
        }
        w.finish(Duration::from_secs(10));
    }
    let after_close = settle_rss(pid, o.settle.min(Duration::from_secs(5))).await;
    generator_cpu += login_usage.generator.cpu_secs;
    let kib_per_conn = match (before, after) {
        (Some(b), Some(a)) if alive > 0 => Some((a as f64 - b as f64) / alive as f64),
        _ => None,
    };
    let server_cpu = login_usage.server.map(|u| u.cpu_secs);
    json!({
        "scenario": "idle",
        "clients": o.clients,
        "processes": procs.max(1),
        "connected": connected,
        "alive_after_settle": alive,
        "failures": failures,
        "first_error": first_error,
        "login_wall_s": login_wall,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_after_close_kib": after_close,
        "kib_per_connection": kib_per_conn,
        "server_cpu_s_logins": server_cpu,
        "server_cpu_ms_per_login": server_cpu.filter(|_| connected > 0).map(|c| c * 1000.0 / connected as f64),
        "server_idle_cores": idle_cpu.server.map(|u| u.cores),
        "generator_cpu_s": generator_cpu,
        "workers": worker_info,
        "server": server_info,
    })
}

/// The worker side of [`idle_memory`]: log in the range, print one JSON
/// line, then answer `count` (how many are still connected) and `close` (or
/// the end of stdin) on stdin; gives up after `hold_limit`.
pub async fn idle_worker(
    common: &Common,
    from: usize,
    count: usize,
    deadline: Duration,
    hold_limit: Duration,
) {
    let window = Window::start(None);
    let mut l = login_many(common, from..from + count, Arc::new(Ignore), deadline).await;
    let usage = window.finish();
    let mut v = logins_json(&mut l);
    v["generator_cpu_s"] = json!(usage.generator.cpu_secs);
    println!("{v}");
    let _ = std::io::stdout().flush();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = tokio::time::Instant::now() + hold_limit;
    loop {
        let cmd = tokio::time::timeout_at(end, rx.recv()).await.ok().flatten();
        match cmd.as_deref() {
            None | Some("close") => break,
            Some("count") => {
                let alive = l.conns.iter().filter(|c| !c.is_closed()).count();
                let server = match l.conns.first() {
                    Some(c) if from == 0 => probe(c, &common.target.domain).await,
                    _ => serde_json::Value::Null,
                };
                println!("{}", json!({"alive": alive, "server": server}));
                let _ = std::io::stdout().flush();
            }
            Some(_) => continue,
        }
    }
    let window = Window::start(None);
    close_all(std::mem::take(&mut l.conns), Duration::from_secs(10)).await;
    println!(
        "{}",
        json!({"closed": true, "generator_cpu_s": window.finish().generator.cpu_secs})
    );
    let _ = std::io::stdout().flush();
}
