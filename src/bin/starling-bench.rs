//! `starling-bench`: the load generator. Real XMPP clients over TLS against
//! any server (Starling, Prosody, ejabberd), on loopback, bounded in count
//! and time. Each scenario prints a summary on stderr and one JSON line on
//! stdout (and appends it to `--out`); `table` turns such lines into the
//! comparison table of docs/benchmarks.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use starling::bench::conn::{MechChoice, Profile, Target};
use starling::bench::fleet::Common;
use starling::bench::login::{IdleOptions, StormOptions, WorkerLauncher};
use starling::bench::messaging::{MessagingOptions, RateSteps};
use starling::bench::muc::MucOptions;
use starling::bench::{login, messaging, muc, report, users};
use starling::client::{KeyCache, Mechanism, TlsMode};

#[derive(Parser)]
#[command(
    name = "starling-bench",
    version,
    about = "XMPP load generator: login storm, idle memory, 1:1 messaging, room fan-out"
)]
struct Cli {
    #[command(flatten)]
    g: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
struct Global {
    /// Server address (loopback only).
    #[arg(long, global = true, default_value = "127.0.0.1:5222")]
    addr: SocketAddr,
    /// XMPP domain of the accounts.
    #[arg(long, global = true, default_value = "localhost")]
    domain: String,
    /// Accounts are <prefix><n>.
    #[arg(long, global = true, default_value = "bench")]
    prefix: String,
    #[arg(long, global = true, default_value = "bench-password")]
    password: String,
    /// starttls, direct or plain.
    #[arg(long, global = true, default_value = "starttls")]
    tls: String,
    /// auto (SCRAM-SHA-256, else SCRAM-SHA-1), scram-sha-256, scram-sha-1, plain.
    #[arg(long, global = true, default_value = "auto")]
    mech: String,
    /// full (SM, carbons, roster, presence) or minimal (presence).
    #[arg(long, global = true, default_value = "full")]
    profile: String,
    /// Do not enable stream management.
    #[arg(long, global = true)]
    no_sm: bool,
    /// Logins in flight at once.
    #[arg(long, global = true, default_value_t = 200)]
    concurrency: usize,
    /// Seconds one login may take.
    #[arg(long, global = true, default_value_t = 60)]
    login_timeout: u64,
    /// The server's PID (for its CPU time and RSS from /proc).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// File keeping salted passwords between runs.
    #[arg(long, global = true)]
    key_cache: Option<PathBuf>,
    /// Name of the server in the results.
    #[arg(long, global = true, default_value = "server")]
    label: String,
    /// Repetition number, recorded in the results.
    #[arg(long, global = true, default_value_t = 1)]
    rep: u32,
    /// Settings to record with the results (free text).
    #[arg(long, global = true, default_value = "")]
    settings: String,
    /// Append each result line to this file.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Hard limit for the whole command, in seconds.
    #[arg(long, global = true, default_value_t = 900)]
    time_limit: u64,
    /// Runtime worker threads (default: the CPUs this process may use).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Args, Clone)]
struct StepArgs {
    /// First offered rate (messages/s; deliveries/s for muc).
    #[arg(long)]
    start_rate: Option<f64>,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 2.0)]
    factor: f64,
    #[arg(long, default_value_t = 256_000.0)]
    max_rate: f64,
    #[arg(long, default_value_t = 12)]
    max_steps: usize,
    /// Seconds per step.
    #[arg(long, default_value_t = 10.0)]
    step_secs: f64,
    /// Seconds to wait for late deliveries after a step.
    #[arg(long, default_value_t = 5.0)]
    drain_secs: f64,
    /// A step fails when its p99 latency exceeds this many milliseconds.
    #[arg(long, default_value_t = 500.0)]
    p99_ms: f64,
    /// Do not retry between the last good and the failed rate.
    #[arg(long)]
    no_refine: bool,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
}

impl StepArgs {
    fn steps(&self, default_start: f64) -> RateSteps {
        RateSteps {
            start_rate: self.start_rate.unwrap_or(default_start),
            factor: self.factor,
            max_rate: self.max_rate,
            max_steps: self.max_steps,
            step: Duration::from_secs_f64(self.step_secs.max(0.1)),
            drain: Duration::from_secs_f64(self.drain_secs.max(0.0)),
            p99_limit_ms: self.p99_ms,
            refine: !self.no_refine,
            ..RateSteps::default()
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the benchmark accounts.
    Users {
        #[command(subcommand)]
        how: UsersCmd,
    },
    /// Log every user in once and out again (fills the key cache; no figures).
    Warm {
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        from: usize,
    },
    /// Scenario 1: N clients log in (logins/s, failures, latency).
    Login {
        #[arg(long)]
        clients: usize,
        #[arg(long, default_value_t = 0)]
        from: usize,
        /// Seconds to keep the sessions after the last login.
        #[arg(long, default_value_t = 2)]
        hold: u64,
    },
    /// Scenario 2: server RSS before and after N idle clients.
    Idle {
        #[arg(long)]
        clients: usize,
        #[arg(long, default_value_t = 0)]
        from: usize,
        /// Seconds to let the server settle before reading its RSS.
        #[arg(long, default_value_t = 10)]
        settle: u64,
        /// Clients per generator process (a process may hold at most 20,000 sockets here).
        #[arg(long, default_value_t = 15_000)]
        per_process: usize,
    },
    /// (internal) one generator process of `idle`.
    #[command(hide = true)]
    IdleWorker {
        #[arg(long)]
        from: usize,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 900)]
        hold_limit: u64,
    },
    /// Scenario 3: pairs exchange messages at a stepped rate.
    Messaging {
        #[arg(long, default_value_t = 1000)]
        pairs: usize,
        #[arg(long, default_value_t = 0)]
        from: usize,
        #[command(flatten)]
        steps: StepArgs,
    },
    /// Scenario 4: one room, N occupants, stepped groupchat rate.
    Muc {
        #[arg(long, default_value_t = 200)]
        occupants: usize,
        #[arg(long, default_value_t = 0)]
        from: usize,
        /// Occupants that send.
        #[arg(long, default_value_t = 10)]
        senders: usize,
        #[command(flatten)]
        steps: StepArgs,
    },
    /// Markdown table from result lines (JSON, one per line).
    Table {
        files: Vec<PathBuf>,
        /// The server whose ratios to the others are shown.
        #[arg(long, default_value = "starling")]
        base: String,
        /// Labels shown without a ratio column (repeatable).
        #[arg(long)]
        no_ratio: Vec<String>,
    },
}

#[derive(Subcommand)]
enum UsersCmd {
    /// Directly in Starling's store (one set of credentials for all).
    Starling {
        /// Database URL, as in Starling's configuration.
        #[arg(long)]
        db: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        from: usize,
        #[arg(long, default_value_t = 4096)]
        iterations: u32,
    },
    /// Prosody account files cloned from one written by `prosodyctl register`.
    Prosody {
        /// <data_path>/<host, encoded>/accounts
        #[arg(long)]
        accounts_dir: PathBuf,
        /// The account file prosodyctl wrote for a user with the benchmark password.
        #[arg(long)]
        template: PathBuf,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        from: usize,
    },
    /// Through ejabberd's mod_http_api (POST <path>/register).
    Ejabberd {
        #[arg(long)]
        api: SocketAddr,
        #[arg(long, default_value = "/api")]
        path: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        from: usize,
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
}

fn common(g: &Global, keys: KeyCache) -> Result<Common, String> {
    if !g.addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address: the generator only loads loopback servers",
            g.addr
        ));
    }
    let tls = match g.tls.as_str() {
        "starttls" => TlsMode::StartTls,
        "direct" => TlsMode::DirectTls,
        "plain" => TlsMode::Plain,
        t => return Err(format!("unknown --tls {t:?}")),
    };
    let mechanism = match g.mech.as_str() {
        "auto" => MechChoice::Auto,
        "scram-sha-256" => MechChoice::Fixed(Mechanism::ScramSha256),
        "scram-sha-1" => MechChoice::Fixed(Mechanism::ScramSha1),
        "plain" => MechChoice::Fixed(Mechanism::Plain),
        m => return Err(format!("unknown --mech {m:?}")),
    };
    let profile: Profile = g.profile.parse()?;
    let mut target = Target::new(g.addr, &g.domain);
    target.tls = tls;
    target.mechanism = mechanism;
    target.keys = keys;
    target.timeout = Duration::from_secs(g.login_timeout.max(1));
    target.sm = !g.no_sm;
    target.profile = profile;
    Ok(Common {
        target,
        prefix: g.prefix.clone(),
        password: g.password.clone(),
        concurrency: g.concurrency,
        server_pid: g.server_pid,
        resource: "bench".into(),
    })
}

/// The global options as arguments, for worker processes.
fn global_args(g: &Global) -> Vec<String> {
    let mut a = vec![
        format!("--addr={}", g.addr),
        format!("--domain={}", g.domain),
        format!("--prefix={}", g.prefix),
        format!("--password={}", g.password),
        format!("--tls={}", g.tls),
        format!("--mech={}", g.mech),
        format!("--profile={}", g.profile),
        format!("--concurrency={}", g.concurrency),
        format!("--login-timeout={}", g.login_timeout),
        format!("--time-limit={}", g.time_limit),
    ];
    if g.no_sm {
        a.push("--no-sm".into());
    }
    if let Some(k) = &g.key_cache {
        a.push(format!("--key-cache={}", k.display()));
    }
    if let Some(t) = g.threads {
        a.push(format!("--threads={t}"));
    }
    a
}

fn emit(g: &Global, mut v: Value) {
    if let Value::Object(m) = &mut v {
        m.insert("label".into(), json!(g.label));
        m.insert("rep".into(), json!(g.rep));
        m.insert(
            "meta".into(),
            json!({
                "settings": g.settings,
                "addr": g.addr.to_string(),
                "concurrency": g.concurrency,
                "profile": g.profile,
                "sm_requested": !g.no_sm,
                "generator": format!("starling-bench {}", env!("CARGO_PKG_VERSION")),
                "unix_time": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            }),
        );
    }
    eprintln!("{}", summary(&v));
    let line = v.to_string();
    println!("{line}");
    if let Some(path) = &g.out {
        use std::io::Write;
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(mut f) => {
                let _ = writeln!(f, "{line}");
            }
            Err(e) => eprintln!("starling-bench: cannot append to {}: {e}", path.display()),
        }
    }
}

/// One human-readable paragraph per result.
fn summary(v: &Value) -> String {
    let label = v["label"].as_str().unwrap_or("");
    let n = |x: &Value| x.as_f64().map(|f| format!("{f:.1}")).unwrap_or("-".into());
    match v["scenario"].as_str().unwrap_or("") {
        "login" => format!(
            "[{label}] login storm {} clients: {} ok, {} failed {}, {} logins/s, latency p50 {} ms p99 {} ms, server {} ms CPU/login, generator {} cores",
            v["clients"],
            v["logins"]["ok"],
            v["logins"]["failed"],
            v["logins"]["failures"],
            n(&v["logins_per_s"]),
            n(&v["logins"]["latency"]["p50_ms"]),
            n(&v["logins"]["latency"]["p99_ms"]),
            n(&v["server_cpu_ms_per_login"]),
            n(&v["generator_cores"]),
        ),
        "idle" => format!(
            "[{label}] idle {} clients: {} connected, RSS {} -> {} KiB ({} KiB/connection), {} KiB after they left, {} ms CPU/login",
            v["clients"],
            v["alive_after_settle"],
            v["rss_before_kib"],
            v["rss_after_kib"],
            n(&v["kib_per_connection"]),
            v["rss_after_close_kib"],
            n(&v["server_cpu_ms_per_login"]),
        ),
        "messaging" | "muc" => {
            if let Some(s) = v["skipped"].as_str() {
                return format!("[{label}] {} skipped: {s}", v["scenario"]);
            }
            let r = &v["result"];
            let at = &r["at_max"];
            format!(
                "[{label}] {}: max sustained {}/s, p50 {} p90 {} p99 {} ms, server {} us CPU/delivery, generator {} cores; stopped: {}",
                v["scenario"],
                n(&r["max_sustained_per_s"]),
                n(&at["latency"]["p50_ms"]),
                n(&at["latency"]["p90_ms"]),
                n(&at["latency"]["p99_ms"]),
                n(&at["server_cpu_us_per_delivery"]),
                n(&at["generator_cores"]),
                r["stopped"].as_str().unwrap_or("-"),
            )
        }
        _ => v.to_string(),
    }
}

/// A scenario that could not do its work (no login at all, an error):
/// not a slow server, a broken run.
fn scenario_failed(v: &Value) -> bool {
    !v["error"].is_null()
        || !v["result"]["error"].is_null()
        || v["logins"]["ok"].as_u64() == Some(0)
        || (v["scenario"] == "idle" && v["alive_after_settle"].as_u64() == Some(0))
}

async fn run(cli: Cli) -> Result<Option<Value>, String> {
    let g = &cli.g;
    let keys = KeyCache::default();
    if let Some(path) = &g.key_cache {
        users::load_key_cache(path, &keys).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let deadline = Duration::from_secs(g.time_limit);
    let result = match &cli.command {
        Cmd::Users { how } => {
            let msg = match how {
                UsersCmd::Starling {
                    db,
                    count,
                    from,
                    iterations,
                } => {
                    let (c, e) = users::create_starling(
                        db,
                        &g.domain,
                        &g.prefix,
                        *from..from + count,
                        &g.password,
                        *iterations,
                    )
                    .await?;
                    format!("{c} accounts created, {e} existed")
                }
                UsersCmd::Prosody {
                    accounts_dir,
                    template,
                    count,
                    from,
                } => {
                    let c = users::create_prosody_files(
                        accounts_dir,
                        template,
                        &g.prefix,
                        *from..from + count,
                    )?;
                    format!("{c} account files written")
                }
                UsersCmd::Ejabberd {
                    api,
                    path,
                    count,
                    from,
                    parallel,
                } => {
                    if !api.ip().is_loopback() {
                        return Err("the ejabberd API must be on loopback".into());
                    }
                    let (c, e) = users::create_ejabberd_http(
                        *api,
                        path,
                        &g.domain,
                        &g.prefix,
                        *from..from + count,
                        &g.password,
                        *parallel,
                    )
                    .await?;
                    format!("{c} accounts registered, {e} existed")
                }
            };
            eprintln!("starling-bench: {msg}");
            None
        }
        Cmd::Warm { count, from } => {
            let c = common(g, keys.clone())?;
            let mut l = starling::bench::fleet::login_many(
                &c,
                *from..from + count,
                std::sync::Arc::new(starling::bench::conn::Ignore),
                deadline,
            )
            .await;
            eprintln!(
                "starling-bench: warm: {} logged in, {} failed {:?} in {:.1} s",
                l.conns.len(),
                l.failed(),
                l.failures,
                l.wall.as_secs_f64()
            );
            starling::bench::conn::close_all(std::mem::take(&mut l.conns), Duration::from_secs(10))
                .await;
            None
        }
        Cmd::Login {
            clients,
            from,
            hold,
        } => {
            let c = common(g, keys.clone())?;
            Some(
                login::login_storm(
                    &c,
                    &StormOptions {
                        clients: *clients,
                        first_user: *from,
                        deadline,
                        hold: Duration::from_secs(*hold),
                    },
                )
                .await,
            )
        }
        Cmd::Idle {
            clients,
            from,
            settle,
            per_process,
        } => {
            let c = common(g, keys.clone())?;
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut args = global_args(g);
            args.push("idle-worker".into());
            let launcher = WorkerLauncher { exe, args };
            Some(
                login::idle_memory(
                    &c,
                    &IdleOptions {
                        clients: *clients,
                        first_user: *from,
                        settle: Duration::from_secs(*settle),
                        deadline,
                        per_process: *per_process,
                    },
                    Some(&launcher),
                )
                .await,
            )
        }
        Cmd::IdleWorker {
            from,
            count,
            hold_limit,
        } => {
            let c = common(g, keys.clone())?;
            login::idle_worker(
                &c,
                *from,
                *count,
                deadline,
                Duration::from_secs(*hold_limit),
            )
            .await;
            None
        }
        Cmd::Messaging { pairs, from, steps } => {
            let c = common(g, keys.clone())?;
            Some(
                messaging::messaging(
                    &c,
                    &MessagingOptions {
                        pairs: *pairs,
                        first_user: *from,
                        body_bytes: steps.body_bytes,
                        login_deadline: deadline,
                        steps: steps.steps(500.0),
                    },
                )
                .await,
            )
        }
        Cmd::Muc {
            occupants,
            from,
            senders,
            steps,
        } => {
            let c = common(g, keys.clone())?;
            Some(
                muc::room_fanout(
                    &c,
                    &MucOptions {
                        occupants: *occupants,
                        first_user: *from,
                        senders: *senders,
                        body_bytes: steps.body_bytes,
                        login_deadline: deadline,
                        join_deadline: Duration::from_secs(g.time_limit.min(300)),
                        steps: steps.steps(2000.0),
                    },
                )
                .await,
            )
        }
        Cmd::Table {
            files,
            base,
            no_ratio,
        } => {
            let mut records = Vec::new();
            for f in files {
                let text =
                    std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
                records.extend(
                    text.lines()
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                        .filter(|v| v["scenario"].is_string()),
                );
            }
            println!("{}", report::setup(&records));
            println!("{}", report::table(&records, base, no_ratio));
            return Ok(None);
        }
    };
    if let Some(path) = &g.key_cache
        && !keys.is_empty()
    {
        users::save_key_cache(path, &keys).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(result)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = cli.g.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starling-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let g = cli.g.clone();
    let limit = Duration::from_secs(g.time_limit + 60);
    let scenario = match &cli.command {
        Cmd::Login { .. } => "login",
        Cmd::Idle { .. } => "idle",
        Cmd::Messaging { .. } => "messaging",
        Cmd::Muc { .. } => "muc",
        _ => "",
    };
    let outcome = rt.block_on(async move { tokio::time::timeout(limit, run(cli)).await });
    let code = match outcome {
        Ok(Ok(Some(v))) => {
            let failed = scenario_failed(&v);
            emit(&g, v);
            if failed {
                eprintln!("starling-bench: the scenario could not run (see above)");
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Ok(Ok(None)) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("starling-bench: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("starling-bench: time limit of {} s reached", g.time_limit);
            if !scenario.is_empty() {
                emit(
                    &g,
                    json!({"scenario": scenario, "error": "time limit reached"}),
                );
            }
            ExitCode::from(3)
        }
    };
    // Connections still open are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}
