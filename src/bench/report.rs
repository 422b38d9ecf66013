//! Results: one JSON line per scenario run (label, repetition, settings,
//! figures), and the comparison table built from such lines: the mean of
//! the repetitions per server, the ratios of one server to the others, and
//! the targets of issue 8 beside them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

/// Whether a bigger figure is better (for reading the ratios).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One figure taken from a result line.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Row order key and title, e.g. "1 login storm, 2000 clients: logins/s".
    pub order: String,
    pub title: String,
    pub value: Option<f64>,
    pub better: Better,
    /// Shown instead of a number (e.g. why a scenario was skipped).
    pub note: Option<String>,
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn fig(order: String, title: String, value: Option<f64>, better: Better) -> Figure {
    Figure {
        order,
        title,
        value,
        better,
        note: None,
    }
}

/// The figures of one result line.
pub fn figures(r: &Value) -> Vec<Figure> {
    let mut out = Vec::new();
    let scenario = r["scenario"].as_str().unwrap_or("");
    match scenario {
        "login" => {
            let n = r["clients"].as_u64().unwrap_or(0);
            let o = |k: usize| format!("1-{n:08}-{k}");
            let t = |s: &str| format!("Login storm, {n} clients: {s}");
            out.push(fig(
                o(1),
                t("logins/s"),
                f(&r["logins_per_s"]),
                Better::Higher,
            ));
            out.push(fig(
                o(2),
                t("login latency p50 (ms)"),
                f(&r["logins"]["latency"]["p50_ms"]),
                Better::Lower,
            ));
            out.push(fig(
                o(3),
                t("login latency p99 (ms)"),
                f(&r["logins"]["latency"]["p99_ms"]),
                Better::Lower,
            ));
            out.push(fig(
                o(4),
                t("failed logins"),
                r["logins"]["failed"].as_u64().map(|v| v as f64),
                Better::Lower,
            ));
            out.push(fig(
                o(5),
                t("server CPU per login (ms)"),
                f(&r["server_cpu_ms_per_login"]),
                Better::Lower,
            ));
            out.push(fig(
                o(6),
                t("generator CPU (cores)"),
                f(&r["generator_cores"]),
                Better::Lower,
            ));
        }
        "idle" => {
            let n = r["clients"].as_u64().unwrap_or(0);
            let o = |k: usize| format!("2-{n:08}-{k}");
            let t = |s: &str| format!("Idle, {n} clients: {s}");
            out.push(fig(
                o(1),
                t("KiB per connection"),
                f(&r["kib_per_connection"]),
                Better::Lower,
            ));
            out.push(fig(
                o(2),
                t("clients connected"),
                r["alive_after_settle"].as_u64().map(|v| v as f64),
                Better::Higher,
            ));
            out.push(fig(
                o(3),
                t("server CPU per login (ms)"),
                f(&r["server_cpu_ms_per_login"]),
                Better::Lower,
            ));
        }
        "messaging" => {
            let res = &r["result"];
            let at = &res["at_max"];
            let o = |k: usize| format!("3-{k}");
            let t = |s: &str| format!("1:1 messaging, {} pairs: {s}", r["pairs"]);
            out.push(fig(
                o(1),
                t("max sustained msgs/s"),
                f(&res["max_sustained_per_s"]),
                Better::Higher,
            ));
            out.push(fig(
                o(2),
                t("latency p50 at max (ms)"),
                f(&at["latency"]["p50_ms"]),
                Better::Lower,
            ));
            out.push(fig(
                o(3),
                t("latency p90 at max (ms)"),
                f(&at["latency"]["p90_ms"]),
                Better::Lower,
            ));
            out.push(fig(
                o(4),
                t("latency p99 at max (ms)"),
                f(&at["latency"]["p99_ms"]),
                Better::Lower,
            ));
            out.push(fig(
                o(5),
                t("server CPU per message at max (us)"),
                f(&at["server_cpu_us_per_delivery"]),
                Better::Lower,
            ));
            let first = &res["first_step"];
            out.push(fig(
                o(6),
                format!(
                    "1:1 messaging, {} pairs: server CPU per message at {}/s (us)",
                    r["pairs"],
                    first["rate"].as_f64().unwrap_or(0.0)
                ),
                f(&first["server_cpu_us_per_delivery"]),
                Better::Lower,
            ));
            out.push(fig(
                o(7),
                t("generator CPU at max (cores)"),
                f(&at["generator_cores"]),
                Better::Lower,
            ));
        }
        "muc" => {
            let n = r["occupants"].as_u64().unwrap_or(0);
            let o = |k: usize| format!("4-{n:08}-{k}");
            let t = |s: &str| format!("Room fan-out, {n} occupants: {s}");
            if let Some(why) = r["skipped"].as_str() {
                let mut x = fig(o(1), t("deliveries/s"), None, Better::Higher);
                x.note = Some(format!("skipped: {why}"));
                out.push(x);
                return out;
            }
            let res = &r["result"];
            let at = &res["at_max"];
            out.push(fig(
                o(1),
                t("max sustained deliveries/s"),
                f(&res["max_sustained_per_s"]),
                Better::Higher,
            ));
            out.push(fig(
                o(2),
                t("latency p99 at max (ms)"),
                f(&at["latency"]["p99_ms"]),
                Better::Lower,
            ));
            out.push(fig(
                o(3),
                t("server CPU per delivery at max (us)"),
                f(&at["server_cpu_us_per_delivery"]),
                Better::Lower,
            ));
            out.push(fig(
                o(4),
                t("generator CPU at max (cores)"),
                f(&at["generator_cores"]),
                Better::Lower,
            ));
        }
        _ => {}
    }
    out
}

/// The target of issue 8 and the incumbents' figures it quotes, for a row.
pub fn target(title: &str) -> &'static str {
    if title.contains("logins/s") {
        ">= 2,000 (ejabberd 270-285, Prosody 125-187)"
    } else if title.contains("KiB per connection") {
        "<= 16 (ejabberd ~75, Prosody 64-72)"
    } else if title.contains("max sustained msgs/s") {
        ">= 30,000 with p99 < 50 ms (ejabberd 1,000, Prosody 500); disk SQLite >= 10,000"
    } else if title.contains("1:1 messaging") && title.contains("p99 at max") {
        "< 50 (at 30,000/s)"
    } else if title.contains("server CPU per message") {
        "<= 30 with archive (ejabberd ~850, Prosody ~1,300)"
    } else if title.contains("deliveries/s") && title.contains("200 occupants") {
        "ejabberd 8,000-12,000, Prosody ~2,000"
    } else if title.contains("server CPU per delivery") {
        "<= 5 (ejabberd ~100)"
    } else if title.contains("server CPU per login") {
        "(ejabberd ~6.0, Prosody ~8.8 at 20k idle clients)"
    } else {
        ""
    }
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    let s = if a >= 100.0 || (v.fract() == 0.0 && a < 1e15) {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    // Thousands separators for the integer part.
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_owned(), Some(f.to_owned())),
        None => (s.clone(), None),
    };
    let neg = int.starts_with('-');
    let digits: Vec<char> = int.trim_start_matches('-').chars().collect();
    let mut grouped = String::new();
    for (i, c) in digits.iter().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(*c);
    }
    format!(
        "{}{}{}",
        if neg { "-" } else { "" },
        grouped,
        frac.map(|f| format!(".{f}")).unwrap_or_default()
    )
}

/// Build the markdown comparison from result lines. `base` is the label
/// whose ratios to every other label are shown (except `exclude` labels,
/// shown as columns only).
pub fn table(records: &[Value], base: &str, no_ratio: &[String]) -> String {
    // label -> row order -> (title, values, better, note)
    let mut labels: Vec<String> = Vec::new();
    type Cell = (String, Vec<f64>, Better, Option<String>);
    let mut rows: BTreeMap<String, BTreeMap<String, Cell>> = BTreeMap::new();
    for r in records {
        let label = r["label"].as_str().unwrap_or("?").to_owned();
        if !labels.contains(&label) {
            labels.push(label.clone());
        }
        for fg in figures(r) {
            let row = rows.entry(fg.order.clone()).or_default();
            let cell = row
                .entry(label.clone())
                .or_insert_with(|| (fg.title.clone(), Vec::new(), fg.better, None));
            if let Some(v) = fg.value.filter(|v| v.is_finite()) {
                cell.1.push(v);
            }
            if fg.note.is_some() {
                cell.3 = fg.note.clone();
            }
        }
    }
    let others: Vec<&String> = labels
        .iter()
        .filter(|l| l.as_str() != base && !no_ratio.contains(l))
        .collect();
    let mut s = String::new();
    let _ = write!(s, "| Figure |");
    for l in &labels {
        let _ = write!(s, " {l} |");
    }
    for o in &others {
        let _ = write!(s, " {base} / {o} |");
    }
    let _ = writeln!(s, " Target (issue 8) |");
    let _ = write!(s, "|---|");
    for _ in 0..labels.len() + others.len() {
        let _ = write!(s, "---:|");
    }
    let _ = writeln!(s, "---|");
    for cells in rows.values() {
        let Some(title) = cells.values().next().map(|c| c.0.clone()) else {
            continue;
        };
        let _ = write!(s, "| {title} |");
        let mean = |l: &str| -> Option<f64> {
            let c = cells.get(l)?;
            if c.1.is_empty() {
                return None;
            }
            Some(c.1.iter().sum::<f64>() / c.1.len() as f64)
        };
        for l in &labels {
            match cells.get(l) {
                Some(c) if !c.1.is_empty() => {
                    let m = mean(l).unwrap_or(0.0);
                    if c.1.len() > 1 {
                        let lo = c.1.iter().cloned().fold(f64::INFINITY, f64::min);
                        let hi = c.1.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let _ = write!(s, " {} ({}-{}) |", fmt_num(m), fmt_num(lo), fmt_num(hi));
                    } else {
                        let _ = write!(s, " {} |", fmt_num(m));
                    }
                }
                Some(c) if c.3.is_some() => {
                    let _ = write!(s, " {} |", c.3.clone().unwrap_or_default());
                }
                _ => {
                    let _ = write!(s, " - |");
                }
            }
        }
        for o in &others {
            match (mean(base), mean(o)) {
                (Some(a), Some(b)) if b != 0.0 => {
                    let _ = write!(s, " {:.2}x |", a / b);
                }
                _ => {
                    let _ = write!(s, " - |");
                }
            }
        }
        let _ = writeln!(s, " {} |", target(&title));
    }
    s
}

/// Per label: software and version as the server reported them, the
/// features it offered, and the settings recorded with the run.
pub fn setup(records: &[Value]) -> String {
    let mut seen: BTreeMap<String, (Value, Value)> = BTreeMap::new();
    for r in records {
        let label = r["label"].as_str().unwrap_or("?").to_owned();
        let e = seen
            .entry(label)
            .or_insert((Value::Null, r["meta"].clone()));
        if e.0.is_null() && r["server"].is_object() {
            e.0 = r["server"].clone();
        }
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| Server | Software (XEP-0092) | SM | MAM | carbons | offline | MUC | Settings |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for (label, (server, meta)) in seen {
        let yes = |k: &str| match server[k].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        let software = format!(
            "{} {}",
            server["software"].as_str().unwrap_or("?"),
            server["version"].as_str().unwrap_or("")
        );
        let settings = meta["settings"].as_str().unwrap_or("").to_owned();
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            software.trim(),
            yes("sm"),
            yes("mam"),
            yes("carbons"),
            yes("offline"),
            server["muc_service"].as_str().unwrap_or("no"),
            settings
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(fmt_num(1234567.0), "1,234,567");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(-1500.0), "-1,500");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(20.0), "20");
    }

    #[test]
    fn table_means_and_ratios() {
        let recs = vec![
            json!({"label": "starling", "scenario": "login", "clients": 2000, "logins_per_s": 3000.0}),
            json!({"label": "starling", "scenario": "login", "clients": 2000, "logins_per_s": 1000.0}),
            json!({"label": "ejabberd", "scenario": "login", "clients": 2000, "logins_per_s": 250.0}),
            json!({"label": "prosody", "scenario": "muc", "occupants": 200, "skipped": "no MUC"}),
        ];
        let t = table(&recs, "starling", &[]);
        assert!(t.contains("| starling | ejabberd | prosody |"), "{t}");
        assert!(
            t.contains("| 2,000 (1,000-3,000) | 250 | - | 8.00x | - |"),
            "{t}"
        );
        assert!(t.contains("skipped: no MUC"), "{t}");
        assert!(t.contains(">= 2,000"), "{t}");
    }

    #[test]
    fn setup_lists_features() {
        let recs = vec![
            json!({"label": "prosody", "meta": {"settings": "storage internal"},
            "server": {"software": "Prosody", "version": "0.12.3", "sm": true, "mam": true,
                       "carbons": true, "offline": true, "muc_service": "conference.localhost"}}),
        ];
        let s = setup(&recs);
        assert!(s.contains("| prosody | Prosody 0.12.3 | yes | yes | yes | yes | conference.localhost | storage internal |"), "{s}");
    }
}
