//! The load generator against a real in-process server: its scenarios
//! complete, deliver every message they send and report the figures. No
//! timed assertion: these tests check that the tool works, not how fast the
//! server is.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{DOMAIN, TestServer};
use starling::auth::StoredCredentials;
use starling::bench::conn::{Ignore, Target};
use starling::bench::fleet::{Common, login_many};
use starling::bench::login::{IdleOptions, StormOptions, idle_memory, login_storm};
use starling::bench::messaging::{MessagingOptions, RateSteps, messaging};
use starling::bench::muc::{MucOptions, room_fanout};
use starling::storage::AccountStore;

const PASSWORD: &str = "bench-pw";

async fn server_with_users(n: usize) -> TestServer {
    let srv = TestServer::start_with(|c| c.limits.max_connections_per_ip = 1000).await;
    let creds = StoredCredentials::from_password(PASSWORD, 4096).unwrap();
    for i in 0..n {
        srv.server()
            .store
            .create_account(DOMAIN, &format!("b{i}"), &creds)
            .await
            .unwrap();
    }
    srv
}

fn common(srv: &TestServer) -> Common {
    Common {
        target: Target::new(srv.addr(), DOMAIN),
        prefix: "b".into(),
        password: PASSWORD.into(),
        concurrency: 8,
        server_pid: Some(std::process::id()),
        resource: "bench".into(),
    }
}

fn short_steps() -> RateSteps {
    RateSteps {
        start_rate: 50.0,
        factor: 2.0,
        max_rate: 100.0,
        max_steps: 2,
        step: Duration::from_millis(500),
        drain: Duration::from_secs(5),
        ..RateSteps::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_storm_logs_everyone_in_and_computes_figures() {
    let srv = server_with_users(12).await;
    let c = common(&srv);
    let r = login_storm(
        &c,
        &StormOptions {
            clients: 12,
            first_user: 0,
            deadline: Duration::from_secs(60),
            hold: Duration::ZERO,
        },
    )
    .await;
    assert_eq!(r["logins"]["ok"], 12, "{r}");
    assert_eq!(r["logins"]["failed"], 0, "{r}");
    assert_eq!(r["logins"]["latency"]["count"], 12);
    assert!(r["logins_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["server_cpu_s"].is_number(), "{r}");
    assert_eq!(r["server"]["software"], "Starling", "{r}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_counts_as_failure() {
    let srv = server_with_users(2).await;
    let mut c = common(&srv);
    c.password = "wrong".into();
    let l = login_many(&c, 0..2, Arc::new(Ignore), Duration::from_secs(30)).await;
    assert_eq!(l.conns.len(), 0);
    assert_eq!(
        l.failures.get("auth-not-authorized").copied(),
        Some(2),
        "{:?}",
        l.failures
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messaging_delivers_every_message_and_steps_up() {
    let srv = server_with_users(8).await;
    let c = common(&srv);
    let r = messaging(
        &c,
        &MessagingOptions {
            pairs: 4,
            first_user: 0,
            body_bytes: 50,
            login_deadline: Duration::from_secs(60),
            steps: short_steps(),
        },
    )
    .await;
    assert_eq!(r["pairs_connected"], 4, "{r}");
    let steps = r["result"]["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{r}");
    for s in steps {
        assert!(s["sent"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(s["sent"], s["delivered"], "every message arrives: {s}");
        assert_eq!(s["errors"], 0, "{s}");
        assert_eq!(s["latency"]["count"], s["delivered"]);
    }
    assert_eq!(r["connections_lost"], 0, "{r}");
    assert!(r["result"]["max_sustained_per_s"].as_f64().unwrap() > 0.0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_memory_reads_the_server_rss() {
    let srv = server_with_users(5).await;
    let c = common(&srv);
    let r = idle_memory(
        &c,
        &IdleOptions {
            clients: 5,
            first_user: 0,
            settle: Duration::from_secs(1),
            deadline: Duration::from_secs(60),
            per_process: 100,
        },
        None,
    )
    .await;
    assert_eq!(r["alive_after_settle"], 5, "{r}");
    assert!(r["rss_before_kib"].as_u64().unwrap() > 0, "{r}");
    assert!(r["kib_per_connection"].is_number(), "{r}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_fanout_runs_or_says_why_not() {
    let srv = server_with_users(4).await;
    let c = common(&srv);
    let r = room_fanout(
        &c,
        &MucOptions {
            occupants: 4,
            first_user: 0,
            senders: 2,
            body_bytes: 50,
            login_deadline: Duration::from_secs(60),
            join_deadline: Duration::from_secs(30),
            steps: short_steps(),
        },
    )
    .await;
    if let Some(why) = r["skipped"].as_str() {
        // No MUC service on this server (yet): the scenario says so.
        assert!(why.contains("no MUC service"), "{r}");
    } else {
        assert_eq!(r["joined"], 4, "{r}");
        for s in r["result"]["steps"].as_array().expect("steps") {
            assert_eq!(s["expected_deliveries"], s["delivered"], "{s}");
        }
    }
    srv.shutdown().await;
}
