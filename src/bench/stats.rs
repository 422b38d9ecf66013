//! Figures: latency percentiles, and CPU time and memory of a process read
//! from `/proc` (the server's by its PID, and the generator's own).

use std::time::Instant;

/// Latency samples in microseconds; percentiles by sorting (exact, and
/// cheap enough for the few million samples one benchmark step collects).
#[derive(Debug, Default, Clone)]
pub struct Samples {
    values: Vec<u32>,
    /// Samples refused because the cap was reached.
    pub dropped: u64,
}

/// At most this many samples are kept per step (about 20 MB).
pub const MAX_SAMPLES: usize = 5_000_000;

impl Samples {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, micros: u64) {
        if self.values.len() < MAX_SAMPLES {
            self.values.push(micros.min(u32::MAX as u64) as u32);
        } else {
            self.dropped += 1;
        }
    }

    pub fn extend(&mut self, other: Samples) {
        for v in other.values {
            self.push(v as u64);
        }
        self.dropped += other.dropped;
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Summary (sorts in place).
    pub fn summary(&mut self) -> Summary {
        self.values.sort_unstable();
        let n = self.values.len();
        let pick = |q: f64| -> f64 {
            if n == 0 {
                return 0.0;
            }
            // Nearest rank.
            let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
            self.values[rank - 1] as f64 / 1000.0
        };
        let mean = if n == 0 {
            0.0
        } else {
            self.values.iter().map(|v| *v as f64).sum::<f64>() / n as f64 / 1000.0
        };
        Summary {
            count: n as u64,
            mean_ms: mean,
            p50_ms: pick(0.50),
            p90_ms: pick(0.90),
            p99_ms: pick(0.99),
            max_ms: pick(1.0),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ: 100 on every
/// Linux ABI Rust targets).
pub const CLK_TCK: f64 = 100.0;

/// CPU time and memory of one process at one moment.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// utime + stime, in seconds.
    pub cpu_secs: f64,
    /// Resident set size in KiB (`VmRSS`).
    pub rss_kib: u64,
    pub at: Instant,
}

/// Parse utime + stime (in ticks) out of a `/proc/<pid>/stat` line.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Parse `VmRSS` (KiB) out of `/proc/<pid>/status`.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Sample a process (`None`: this process).
pub fn sample(pid: Option<u32>) -> std::io::Result<ProcSample> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_owned(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat"))?;
    let status = std::fs::read_to_string(format!("{dir}/status"))?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{dir}/stat"));
    let ticks = parse_stat_cpu_ticks(&stat).ok_or_else(bad)?;
    Ok(ProcSample {
        cpu_secs: ticks as f64 / CLK_TCK,
        rss_kib: parse_status_rss_kib(&status).unwrap_or(0),
        at: Instant::now(),
    })
}

/// CPU seconds used between two samples, and the share of one core.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuUse {
    pub cpu_secs: f64,
    pub wall_secs: f64,
    /// cpu / wall: 1.0 means one core fully busy.
    pub cores: f64,
}

impl CpuUse {
    pub fn between(a: &ProcSample, b: &ProcSample) -> CpuUse {
        let cpu = (b.cpu_secs - a.cpu_secs).max(0.0);
        let wall = b.at.duration_since(a.at).as_secs_f64();
        CpuUse {
            cpu_secs: cpu,
            wall_secs: wall,
            cores: if wall > 0.0 { cpu / wall } else { 0.0 },
        }
    }
}

/// Busy and total ticks per CPU from `/proc/stat` (`cpuN` lines).
pub fn parse_proc_stat_cpus(stat: &str) -> Vec<(u64, u64)> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle + iowait are not busy.
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle.min(total), total)
        })
        .collect()
}

fn cpu_ticks() -> Vec<(u64, u64)> {
    std::fs::read_to_string("/proc/stat")
        .map(|s| parse_proc_stat_cpus(&s))
        .unwrap_or_default()
}

/// Watches the server process (when its PID is known), this generator
/// process and the machine's CPUs over one measurement window.
pub struct Window {
    server_pid: Option<u32>,
    server: Option<ProcSample>,
    me: Option<ProcSample>,
    cpus: Vec<(u64, u64)>,
}

/// What a [`Window`] measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WindowUse {
    pub server: Option<CpuUse>,
    pub server_rss_kib: Option<u64>,
    pub generator: CpuUse,
    /// Share of each CPU that was busy (anyone's work), 0..1.
    pub cpu_busy: Vec<f64>,
}

impl Window {
    pub fn start(server_pid: Option<u32>) -> Window {
        Window {
            server_pid,
            server: server_pid.and_then(|p| sample(Some(p)).ok()),
            me: sample(None).ok(),
            cpus: cpu_ticks(),
        }
    }

    pub fn finish(&self) -> WindowUse {
        let server_now = self.server_pid.and_then(|p| sample(Some(p)).ok());
        let me_now = sample(None).ok();
        let cpus_now = cpu_ticks();
        let cpu_busy = self
            .cpus
            .iter()
            .zip(cpus_now.iter())
            .map(|((b0, t0), (b1, t1))| {
                let t = t1.saturating_sub(*t0);
                if t == 0 {
                    0.0
                } else {
                    b1.saturating_sub(*b0) as f64 / t as f64
                }
            })
            .collect();
        WindowUse {
            cpu_busy,
            server: match (&self.server, &server_now) {
                (Some(a), Some(b)) => Some(CpuUse::between(a, b)),
                _ => None,
            },
            server_rss_kib: server_now.map(|s| s.rss_kib),
            generator: match (&self.me, &me_now) {
                (Some(a), Some(b)) => CpuUse::between(a, b),
                _ => CpuUse::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_spaces_in_name() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 5 1000 200";
        assert_eq!(parse_stat_cpu_ticks(line), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_rss() {
        let s = "Name:\tstarling\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads: 3\n";
        assert_eq!(parse_status_rss_kib(s), Some(12345));
        assert_eq!(parse_status_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn proc_stat_cpus() {
        let s = "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 0 0 0\ncpu1 5 0 5 38 2 0 0 0 0 0\nintr 1\n";
        assert_eq!(parse_proc_stat_cpus(s), vec![(10, 50), (10, 50)]);
    }

    #[test]
    fn own_process_can_be_sampled() {
        let s = sample(None).unwrap();
        assert!(s.rss_kib > 0);
        assert!(s.cpu_secs >= 0.0);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let mut s = Samples::new();
        for v in 1..=100u64 {
            s.push(v * 1000);
        }
        let sum = s.summary();
        assert_eq!(sum.count, 100);
        assert_eq!(sum.p50_ms, 50.0);
        assert_eq!(sum.p90_ms, 90.0);
        assert_eq!(sum.p99_ms, 99.0);
        assert_eq!(sum.max_ms, 100.0);
        assert!((sum.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(Samples::new().summary().count, 0);
    }
}
