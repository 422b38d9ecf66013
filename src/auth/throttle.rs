//! Throttling of failed authentication attempts, per IP address and per
//! account. After `max_failures` failures within `window`, further attempts
//! from that IP, or for that account, are refused with
//! `temporary-auth-failure` until `window` has passed since the last failure.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
}

#[derive(Debug)]
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    max_entries: usize,
    inner: Mutex<(HashMap<IpAddr, Entry>, HashMap<String, Entry>)>,
}

impl AuthThrottle {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        AuthThrottle {
            max_failures,
            window,
            max_entries: 100_000,
            inner: Mutex::new((HashMap::new(), HashMap::new())),
        }
    }

    fn blocked(&self, e: Option<&Entry>, now: Instant) -> bool {
        matches!(e, Some(e) if e.failures >= self.max_failures && now.duration_since(e.last) < self.window)
    }

    /// May this IP try to authenticate as `account` now?
    pub fn allowed(&self, ip: IpAddr, account: Option<&str>) -> bool {
        let now = Instant::now();
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if self.blocked(guard.0.get(&ip), now) {
            return false;
        }
        match account {
            Some(a) => !self.blocked(guard.1.get(a), now),
            None => true,
        }
    }

    pub fn record_failure(&self, ip: IpAddr, account: Option<&str>) {
        let now = Instant::now();
        let window = self.window;
        let bump = |e: &mut Entry| {
            if now.duration_since(e.last) >= window {
                e.failures = 0;
            }
            e.failures += 1;
            e.last = now;
        };
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let max = self.max_entries;
        let (ips, accounts) = &mut *guard;
        if ips.len() >= max {
            ips.retain(|_, e| now.duration_since(e.last) < window);
        }
        bump(ips.entry(ip).or_insert(Entry {
            failures: 0,
            last: now,
        }));
        if let Some(a) = account {
            if accounts.len() >= max {
                accounts.retain(|_, e| now.duration_since(e.last) < window);
            }
            bump(accounts.entry(a.to_owned()).or_insert(Entry {
                failures: 0,
                last: now,
            }));
        }
    }

    pub fn record_success(&self, ip: IpAddr, account: &str) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.remove(&ip);
        guard.1.remove(account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn blocks_after_max_failures_and_recovers() {
        let t = AuthThrottle::new(3, Duration::from_secs(60));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(t.allowed(ip, Some("a")));
            t.record_failure(ip, Some("a"));
        }
        assert!(!t.allowed(ip, Some("b")), "ip should be blocked");
        assert!(!t.allowed(other, Some("a")), "account should be blocked");
        assert!(t.allowed(other, Some("b")));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(t.allowed(ip, Some("a")));
        t.record_failure(ip, Some("a"));
        assert!(
            t.allowed(ip, Some("a")),
            "counter restarts after the window"
        );
        t.record_success(ip, "a");
        assert!(t.allowed(ip, Some("a")));
    }
}
