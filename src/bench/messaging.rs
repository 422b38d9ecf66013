//! Scenario 3: one-to-one messaging. Pairs of connected users send each
//! other chat messages at an offered rate that steps up until the p99
//! end-to-end latency passes the limit or delivery falls behind. Per step:
//! messages offered and delivered, latency percentiles, server CPU per
//! delivered message, and the generator's own CPU (so that a saturated
//! generator is not mistaken for a slow server).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use minidom::Element;
use serde_json::json;

use super::conn::{BENCH_NS, Conn, Handler, close_all, now_us};
use super::fleet::{Common, login_many, logins_json, probe};
use super::stats::{Samples, Window};
use super::users::username;

#[derive(Clone)]
pub struct RateSteps {
    pub start_rate: f64,
    /// Each step offers `factor` times the rate of the one before.
    pub factor: f64,
    pub max_rate: f64,
    pub max_steps: usize,
    pub step: Duration,
    /// After a step, wait this long at most for late deliveries.
    pub drain: Duration,
    /// A step fails when its p99 latency is above this.
    pub p99_limit_ms: f64,
    /// After the first failure, try once between the last good rate and the
    /// failed one.
    pub refine: bool,
    /// A connection with more than this many bytes not yet written counts
    /// as not reading (the message is not offered).
    pub max_queued: usize,
}

impl Default for RateSteps {
    fn default() -> Self {
        RateSteps {
            start_rate: 500.0,
            factor: 2.0,
            max_rate: 128_000.0,
            max_steps: 12,
            step: Duration::from_secs(10),
            drain: Duration::from_secs(5),
            p99_limit_ms: 500.0,
            refine: true,
            max_queued: 256 * 1024,
        }
    }
}

impl RateSteps {
    /// The rates to offer, in order (before refinement).
    pub fn rates(&self) -> Vec<f64> {
        let mut v = Vec::new();
        let mut r = self.start_rate.max(1.0);
        while r <= self.max_rate && v.len() < self.max_steps {
            v.push(r.round());
            r *= self.factor.max(1.01);
        }
        v
    }
}

pub struct MessagingOptions {
    pub pairs: usize,
    pub first_user: usize,
    pub body_bytes: usize,
    pub login_deadline: Duration,
    pub steps: RateSteps,
}

/// Counts what arrives, per step: latencies of this step's messages, late
/// ones from earlier steps, and bounces.
#[derive(Default)]
pub struct Recorder {
    step: AtomicU64,
    pub received: AtomicU64,
    pub late: AtomicU64,
    pub errors: AtomicU64,
    pub closed: AtomicU64,
    samples: Mutex<Samples>,
    pub first_error: Mutex<Option<String>>,
}

impl Recorder {
    pub fn begin(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
        self.received.store(0, Ordering::Relaxed);
        self.errors.store(0, Ordering::Relaxed);
        self.late.store(0, Ordering::Relaxed);
        *self.samples.lock().unwrap_or_else(|p| p.into_inner()) = Samples::new();
    }

    pub fn take_samples(&self) -> Samples {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Record one message carrying the generator's payload; `weight` for
    /// errors only.
    pub fn record(&self, msg: &Element) {
        if msg.attr("type") == Some("error") {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let mut f = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some(crate::xml::writer::to_string(msg));
            }
            return;
        }
        let Some(b) = msg.get_child("bench", BENCH_NS) else {
            return;
        };
        let (Some(t), Some(k)) = (
            b.attr("t").and_then(|v| v.parse::<u64>().ok()),
            b.attr("k").and_then(|v| v.parse::<u64>().ok()),
        ) else {
            return;
        };
        if k != self.step.load(Ordering::Relaxed) {
            self.late.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = now_us();
        self.received.fetch_add(1, Ordering::Relaxed);
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(now.saturating_sub(t));
    }
}

impl Handler for Recorder {
    fn message(&self, _idx: usize, msg: &Element) {
        self.record(msg);
    }
    fn closed(&self, _idx: usize, reason: &str) {
        if !reason.is_empty() {
            self.closed.fetch_add(1, Ordering::Relaxed);
            let mut f = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some(format!("connection closed: {reason}"));
            }
        }
    }
}

/// One sender: its connection and the pre-built start of each message.
pub struct Sender<'a> {
    pub conn: &'a Conn,
    /// `<message to='..' type='..'` (without the closing `>`).
    pub head: String,
}

/// What one step measured.
pub struct StepOutcome {
    pub json: serde_json::Value,
    pub passed: bool,
    pub generator_saturated: bool,
    /// Deliveries per second over the step (what the receivers got).
    pub delivered_rate: f64,
}

/// Offer `rate` messages per second, round-robin over `senders`, for
/// `steps.step`; `fanout` deliveries are expected per message.
#[allow(clippy::too_many_arguments)]
pub async fn run_step(
    senders: &[Sender<'_>],
    rec: &Recorder,
    step_no: u64,
    rate: f64,
    fanout: u64,
    body: &str,
    steps: &RateSteps,
    server_pid: Option<u32>,
    seq: &AtomicU64,
) -> StepOutcome {
    rec.begin(step_no);
    let window = Window::start(server_pid);
    let start = Instant::now();
    let (mut sent, mut skipped) = (0u64, 0u64);
    let mut next = 0usize;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    if !senders.is_empty() {
        loop {
            ticker.tick().await;
            let elapsed = start.elapsed();
            if elapsed >= steps.step {
                break;
            }
            let due = (rate * elapsed.as_secs_f64()) as u64;
            while sent + skipped < due {
                let s = &senders[next];
                next = (next + 1) % senders.len();
                let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
                let msg = format!(
                    "{} id='b{n}'><body>{body}</body><bench xmlns='{BENCH_NS}' t='{}' s='{n}' k='{step_no}'/></message>",
                    s.head,
                    now_us(),
                );
                if s.conn.send_bytes(msg.into_bytes(), steps.max_queued) {
                    sent += 1;
                } else {
                    skipped += 1;
                }
            }
        }
    }
    let send_wall = start.elapsed().as_secs_f64();
    let expected = sent * fanout;
    let drain_end = Instant::now() + steps.drain;
    while Instant::now() < drain_end && rec.received.load(Ordering::Relaxed) < expected {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let usage = window.finish();
    let received = rec.received.load(Ordering::Relaxed);
    let errors = rec.errors.load(Ordering::Relaxed);
    let mut samples = rec.take_samples();
    let lat = samples.summary();
    let offered = rate * steps.step.as_secs_f64();
    let delivered_ratio = if expected > 0 {
        received as f64 / expected as f64
    } else {
        0.0
    };
    let delivered_rate = received as f64 / send_wall.max(1e-9);
    let generator_saturated = usage.generator.cores > 0.9;
    let mut reasons = Vec::new();
    if lat.p99_ms > steps.p99_limit_ms {
        reasons.push(format!(
            "p99 {:.1} ms over {} ms",
            lat.p99_ms, steps.p99_limit_ms
        ));
    }
    if delivered_ratio < 0.99 {
        reasons.push(format!(
            "delivery behind: {received} of {expected} within {:.0} s of the step's end",
            steps.drain.as_secs_f64()
        ));
    }
    if (sent as f64) < 0.95 * offered {
        reasons.push(format!(
            "only {sent} of {offered:.0} offered ({skipped} not taken: server not reading)"
        ));
    }
    if errors > 0 {
        reasons.push(format!("{errors} error replies"));
    }
    let passed = reasons.is_empty();
    // A server that failed without using a whole core did not get one
    // (other work on its CPU), or waits on something else (disk).
    let server_cores = usage.server.map(|u| u.cores);
    if !passed && let Some(c) = server_cores.filter(|c| *c < 0.8) {
        reasons.push(format!(
            "note: the server used only {c:.2} of a core (CPUs busy: {:?})",
            usage
                .cpu_busy
                .iter()
                .map(|b| (b * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        ));
    }
    let server_cpu = usage.server.map(|u| u.cpu_secs);
    let json = json!({
        "rate": rate,
        "offered_deliveries_per_s": rate * fanout as f64,
        "sent": sent,
        "not_offered": skipped,
        "expected_deliveries": expected,
        "delivered": received,
        "late_from_earlier_steps": rec.late.load(Ordering::Relaxed),
        "errors": errors,
        "delivered_per_s": delivered_rate,
        "latency": lat,
        "server_cpu_s": server_cpu,
        "server_cores": server_cores,
        "cpu_busy": usage.cpu_busy,
        "server_cpu_us_per_delivery": server_cpu.filter(|_| received > 0).map(|c| c * 1e6 / received as f64),
        "server_rss_kib": usage.server_rss_kib,
        "generator_cpu_s": usage.generator.cpu_secs,
        "generator_cores": usage.generator.cores,
        "generator_saturated": generator_saturated,
        "passed": passed,
        "reasons": reasons,
    });
    StepOutcome {
        json,
        passed,
        generator_saturated,
        delivered_rate,
    }
}

/// Step the rate up with `run`, which measures one rate; stop at the first
/// failure (after one refinement between the last good rate and the failed
/// one), when the generator saturates, or at the end of the list.
pub async fn step_up<F, Fut>(steps: &RateSteps, mut run: F) -> serde_json::Value
where
    F: FnMut(u64, f64) -> Fut,
    Fut: std::future::Future<Output = StepOutcome>,
{
    let mut results = Vec::new();
    let mut best: Option<(f64, serde_json::Value)> = None;
    let mut stop = "reached the highest rate configured".to_owned();
    let mut step_no = 0u64;
    let mut last_good: Option<f64> = None;
    let mut failed_at: Option<f64> = None;
    for rate in steps.rates() {
        step_no += 1;
        let o = run(step_no, rate).await;
        eprintln!(
            "  step {step_no}: offered {rate:.0}/s -> {:.0}/s delivered, p99 {:.1} ms, {}",
            o.delivered_rate,
            o.json["latency"]["p99_ms"].as_f64().unwrap_or(0.0),
            if o.passed {
                "ok".to_owned()
            } else {
                format!("FAILED {}", o.json["reasons"])
            }
        );
        results.push(o.json.clone());
        if o.passed {
            last_good = Some(rate);
            if best
                .as_ref()
                .map(|b| o.delivered_rate > b.0)
                .unwrap_or(true)
            {
                best = Some((o.delivered_rate, o.json.clone()));
            }
        } else {
            failed_at = Some(rate);
            stop = format!("failed at {rate:.0}/s offered");
        }
        if o.generator_saturated {
            stop = format!(
                "generator saturated at {rate:.0}/s offered (its own CPU limit, not the server's)"
            );
            break;
        }
        if !o.passed {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The first rate was already too much: halve it (three times at most)
    // to find a rate the server sustains.
    if last_good.is_none()
        && let Some(mut rate) = failed_at
    {
        for _ in 0..3 {
            rate = (rate / 2.0).round();
            if rate < 1.0 {
                break;
            }
            step_no += 1;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let o = run(step_no, rate).await;
            eprintln!(
                "  down {step_no}: offered {rate:.0}/s -> {:.0}/s delivered, p99 {:.1} ms, {}",
                o.delivered_rate,
                o.json["latency"]["p99_ms"].as_f64().unwrap_or(0.0),
                if o.passed { "ok" } else { "FAILED" }
            );
            results.push(o.json.clone());
            if o.passed {
                best = Some((o.delivered_rate, o.json.clone()));
                last_good = Some(rate);
                break;
            }
            failed_at = Some(rate);
        }
        if last_good.is_some() {
            // Refine between this rate and the one above it.
            failed_at = last_good.map(|g| g * 2.0);
        }
    }
    if steps.refine
        && let (Some(good), Some(bad)) = (last_good, failed_at)
        && bad / good > 1.3
    {
        step_no += 1;
        let rate = (good * bad).sqrt().round();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let o = run(step_no, rate).await;
        eprintln!(
            "  refine {step_no}: offered {rate:.0}/s -> {:.0}/s delivered, p99 {:.1} ms, {}",
            o.delivered_rate,
            o.json["latency"]["p99_ms"].as_f64().unwrap_or(0.0),
            if o.passed { "ok" } else { "FAILED" }
        );
        results.push(o.json.clone());
        if o.passed
            && best
                .as_ref()
                .map(|b| o.delivered_rate > b.0)
                .unwrap_or(true)
        {
            best = Some((o.delivered_rate, o.json.clone()));
        }
    }
    let first = results.first().cloned().unwrap_or(serde_json::Value::Null);
    json!({
        "max_sustained_per_s": best.as_ref().map(|b| b.0),
        "at_max": best.map(|b| b.1),
        "first_step": first,
        "stopped": stop,
        "steps": results,
    })
}

pub fn filler(bytes: usize) -> String {
    const WORDS: &str = "the quick brown fox jumps over the lazy dog ";
    WORDS.chars().cycle().take(bytes).collect()
}

pub async fn messaging(common: &Common, o: &MessagingOptions) -> serde_json::Value {
    let rec = Arc::new(Recorder::default());
    let users = o.first_user..o.first_user + 2 * o.pairs;
    let mut l = login_many(common, users, rec.clone(), o.login_deadline).await;
    let logins = logins_json(&mut l);
    let by_idx: HashMap<usize, &Conn> = l.conns.iter().map(|c| (c.idx, c)).collect();
    let mut senders = Vec::new();
    let domain = &common.target.domain;
    for p in 0..o.pairs {
        let (a, b) = (o.first_user + 2 * p, o.first_user + 2 * p + 1);
        if let (Some(ca), Some(cb)) = (by_idx.get(&a), by_idx.get(&b)) {
            for (from, to) in [(ca, b), (cb, a)] {
                senders.push(Sender {
                    conn: from,
                    head: format!(
                        "<message to='{}@{}' type='chat'",
                        username(&common.prefix, to),
                        domain
                    ),
                });
            }
        }
    }
    let pairs_ok = senders.len() / 2;
    let server = match l.conns.first() {
        Some(c) => probe(c, domain).await,
        None => serde_json::Value::Null,
    };
    let body = filler(o.body_bytes);
    let seq = AtomicU64::new(0);
    let result = if pairs_ok == 0 {
        json!({"error": "no pair could log in"})
    } else {
        eprintln!("messaging: {pairs_ok} pairs connected");
        let (senders, rec, body, seq, steps) = (&senders, &rec, &body, &seq, &o.steps);
        let pid = common.server_pid;
        step_up(steps, |step_no, rate| async move {
            run_step(senders, rec, step_no, rate, 1, body, steps, pid, seq).await
        })
        .await
    };
    let closed = rec.closed.load(Ordering::Relaxed);
    let first_error = rec
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    drop(senders);
    close_all(std::mem::take(&mut l.conns), Duration::from_secs(10)).await;
    json!({
        "scenario": "messaging",
        "pairs": o.pairs,
        "pairs_connected": pairs_ok,
        "body_bytes": o.body_bytes,
        "logins": logins,
        "result": result,
        "connections_lost": closed,
        "first_error": first_error,
        "server": server,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_steps() {
        let s = RateSteps {
            start_rate: 500.0,
            factor: 2.0,
            max_rate: 5000.0,
            max_steps: 10,
            ..RateSteps::default()
        };
        assert_eq!(s.rates(), vec![500.0, 1000.0, 2000.0, 4000.0]);
        let s2 = RateSteps { max_steps: 2, ..s };
        assert_eq!(s2.rates(), vec![500.0, 1000.0]);
    }

    #[test]
    fn recorder_counts_by_step() {
        let r = Recorder::default();
        r.begin(2);
        let now = now_us();
        let m = |k: u64| -> Element {
            format!(
                "<message xmlns='jabber:client' type='chat'><body>x</body><bench xmlns='{BENCH_NS}' t='{now}' s='1' k='{k}'/></message>"
            )
            .parse()
            .unwrap()
        };
        r.record(&m(2));
        r.record(&m(1));
        r.record(
            &"<message xmlns='jabber:client' type='error'/>"
                .parse()
                .unwrap(),
        );
        assert_eq!(r.received.load(Ordering::Relaxed), 1);
        assert_eq!(r.late.load(Ordering::Relaxed), 1);
        assert_eq!(r.errors.load(Ordering::Relaxed), 1);
        assert_eq!(r.take_samples().len(), 1);
    }

    #[test]
    fn filler_has_the_size() {
        assert_eq!(filler(100).len(), 100);
        assert!(!filler(10).contains('<'));
    }
}
