//! Micro-benchmarks of the hot paths: `cargo bench` (or `cargo bench --
//! NAME` to run the benchmarks whose name contains NAME).
//!
//! A small harness of our own (no criterion: it would add about 40 crates
//! to the build): each benchmark runs for a warm-up and then for several
//! samples of about 0.3 s; the median time per iteration is reported, with
//! the throughput in bytes and items per second.

use std::hint::black_box;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jid::{BareJid, FullJid};
use minidom::Element;
use starling::auth::scram::{ChannelBindings, ScramServer};
use starling::auth::{ScramHash, StoredCredentials};
use starling::sessions::SessionTable;
use starling::xml::{StreamEvent, StreamParser, ns, serialize_into};

struct Harness {
    filters: Vec<String>,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            filters: std::env::args()
                .skip(1)
                .filter(|a| !a.starts_with("--"))
                .collect(),
        }
    }

    /// Run `f` (one iteration processes `bytes` bytes and `items` items).
    fn bench(&self, name: &str, bytes: u64, items: u64, item: &str, mut f: impl FnMut()) {
        if !self.filters.is_empty() && !self.filters.iter().any(|x| name.contains(x.as_str())) {
            return;
        }
        // Warm up and find an iteration count that takes about 0.3 s.
        let mut iters: u64 = 1;
        loop {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            let e = t.elapsed();
            if e >= Duration::from_millis(100) {
                let per = e.as_secs_f64() / iters as f64;
                iters = ((0.3 / per) as u64).max(1);
                break;
            }
            iters *= 2;
        }
        let mut samples: Vec<f64> = (0..7)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                t.elapsed().as_secs_f64() / iters as f64
            })
            .collect();
        samples.sort_by(|a, b| a.total_cmp(b));
        let median = samples[samples.len() / 2];
        let spread = (samples[samples.len() - 1] - samples[0]) / median * 100.0;
        let mut line = format!("{name:<52} {:>12}/iter (±{spread:.0}%)", fmt_time(median));
        if bytes > 0 {
            line += &format!("  {:>9.1} MB/s", bytes as f64 / median / 1e6);
        }
        if items > 0 {
            line += &format!("  {:>12.0} {item}/s", items as f64 / median);
        }
        println!("{line}");
    }
}

fn fmt_time(secs: f64) -> String {
    if secs >= 1e-3 {
        format!("{:.2} ms", secs * 1e3)
    } else if secs >= 1e-6 {
        format!("{:.2} us", secs * 1e6)
    } else {
        format!("{:.1} ns", secs * 1e9)
    }
}

/// A chat message as clients send it (about 300 bytes).
fn message(i: usize) -> String {
    format!(
        "<message to='juliet{i}@example.org' from='romeo@example.net/orchard' type='chat' \
         id='msg-{i}-a7b3c9' xml:lang='en'><body>Art thou not Romeo, and a Montague? \
         Neither, fair saint, if either thee dislike. &lt;3</body>\
         <active xmlns='http://jabber.org/protocol/chatstates'/>\
         <request xmlns='urn:xmpp:receipts'/><origin-id xmlns='urn:xmpp:sid:0' id='o-{i}'/></message>"
    )
}

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
     xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>";

fn xml_reader(h: &Harness) {
    let n = 1000;
    let mut stream = HEADER.as_bytes().to_vec();
    for i in 0..n {
        stream.extend_from_slice(message(i).as_bytes());
    }
    let bytes = stream.len() as u64;
    for chunk in [4096usize, 16 * 1024] {
        h.bench(
            &format!("xml reader: 1000 messages, {}-byte reads", chunk),
            bytes,
            n as u64,
            "stanzas",
            || {
                let mut p = StreamParser::new(256 * 1024);
                let mut count = 0;
                for c in stream.chunks(chunk) {
                    p.feed(c).expect("valid stream");
                    while let Some(ev) = p.next_event() {
                        if let StreamEvent::Element(e) = ev {
                            count += 1;
                            black_box(e);
                        }
                    }
                }
                assert_eq!(count, n);
            },
        );
    }
}

fn serialisation(h: &Harness) {
    let mut p = StreamParser::new(256 * 1024);
    p.feed(HEADER.as_bytes()).unwrap();
    p.feed(message(1).as_bytes()).unwrap();
    let el: Element = loop {
        match p.next_event() {
            Some(StreamEvent::Element(e)) => break e,
            Some(_) => continue,
            None => panic!("no element"),
        }
    };
    let mut out = Vec::with_capacity(1024);
    serialize_into(&mut out, &el, ns::CLIENT);
    let len = out.len() as u64;
    h.bench(
        "stanza serialisation: one message",
        len,
        1,
        "stanzas",
        || {
            out.clear();
            serialize_into(&mut out, black_box(&el), ns::CLIENT);
            black_box(&out);
        },
    );
    h.bench("stanza clone + serialisation", len, 1, "stanzas", || {
        out.clear();
        let c = black_box(&el).clone();
        serialize_into(&mut out, &c, ns::CLIENT);
        black_box(&out);
    });
}

/// The client side of one SCRAM exchange, with the salted password already
/// known (as a client that caches it): returns client-final.
fn client_final(hash: ScramHash, salted: &[u8], first_bare: &str, server_first: &str) -> String {
    let nonce = server_first
        .split(',')
        .find_map(|p| p.strip_prefix("r="))
        .expect("nonce");
    let without_proof = format!("c={},r={nonce}", B64.encode("n,,"));
    let auth_message = format!("{first_bare},{server_first},{without_proof}");
    let client_key = hash.hmac(salted, b"Client Key");
    let stored_key = hash.hash(&client_key);
    let signature = hash.hmac(&stored_key, auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(signature)
        .map(|(a, b)| a ^ b)
        .collect();
    format!("{without_proof},p={}", B64.encode(proof))
}

fn scram(h: &Harness) {
    let creds = StoredCredentials::from_password("pencil", 4096).unwrap();
    for hash in [ScramHash::Sha256, ScramHash::Sha1] {
        let keys = creds.keys(hash).clone();
        let salted = hash.salted_password(b"pencil", &keys.salt, keys.iterations);
        let first_bare = "n=user,r=fyko+d2lbbFgONRv9qkxdawL";
        let client_first = format!("n,,{first_bare}");
        // The client's part alone, to subtract from the exchange below.
        let mut sample_server = ScramServer::new(hash, false, false, ChannelBindings::default());
        sample_server.client_first(client_first.as_bytes()).unwrap();
        let sf =
            String::from_utf8(sample_server.server_first(Some(keys.clone()), b"seed")).unwrap();
        let name = hash.mechanism(false);
        h.bench(
            &format!("scram {name}: client proof only"),
            0,
            1,
            "proofs",
            || {
                black_box(client_final(hash, &salted, first_bare, &sf));
            },
        );
        h.bench(
            &format!("scram {name}: server exchange + client proof"),
            0,
            1,
            "logins",
            || {
                let mut s = ScramServer::new(hash, false, false, ChannelBindings::default());
                s.client_first(client_first.as_bytes()).unwrap();
                let sf = String::from_utf8(s.server_first(Some(keys.clone()), b"seed")).unwrap();
                let cf = client_final(hash, &salted, first_bare, &sf);
                black_box(s.client_final(cf.as_bytes()).expect("valid proof"));
            },
        );
    }
    h.bench(
        "scram: PBKDF2-SHA-256, 4096 iterations",
        0,
        1,
        "derivations",
        || {
            black_box(ScramHash::Sha256.salted_password(b"pencil", b"saltsaltsaltsalt", 4096));
        },
    );
}

fn router(h: &Harness) {
    for n in [2_000usize, 20_000] {
        let table = SessionTable::new();
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let mut bares = Vec::with_capacity(n);
        for i in 0..n {
            let full = FullJid::new(&format!("user{i}@example.org/res")).unwrap();
            let (s, _) = table.bind(full.clone(), tx.clone(), None);
            s.available
                .store(true, std::sync::atomic::Ordering::Relaxed);
            bares.push(full.to_bare());
        }
        let mut i = 0;
        h.bench(
            &format!("router: message_targets among {n} sessions"),
            0,
            1,
            "lookups",
            || {
                i = (i + 7919) % n;
                let t = table.message_targets(black_box(&bares[i]));
                assert_eq!(t.len(), 1);
            },
        );
        let jids: Vec<String> = (0..n).map(|i| format!("user{i}@example.org")).collect();
        h.bench(
            &format!("router: parse 'to' + targets among {n}"),
            0,
            1,
            "lookups",
            || {
                i = (i + 7919) % n;
                let bare = BareJid::new(black_box(&jids[i])).unwrap();
                black_box(table.message_targets(&bare));
            },
        );
    }
}

fn main() {
    let h = Harness::new();
    println!(
        "starling hot paths ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    xml_reader(&h);
    serialisation(&h);
    scram(&h);
    router(&h);
}
