//! Benchmark accounts: created before a run, directly in Starling's store,
//! through ejabberd's HTTP API, or as Prosody account files cloned from one
//! that `prosodyctl register` wrote. And the client-side SCRAM key cache,
//! kept in a file between runs so that the generator computes PBKDF2 once
//! per (password, salt) and not once per login.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::auth::StoredCredentials;
use crate::client::{KeyCache, KeyCacheEntry};
use crate::storage::{AccountStore, Store};

/// The name of benchmark user `i`.
pub fn username(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}")
}

/// Load a key cache file (missing file: empty cache).
pub fn load_key_cache(path: &Path, cache: &KeyCache) -> std::io::Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let [hash, iterations, salt, salted, password] = f[..] else {
            continue;
        };
        let (Ok(iterations), Ok(salt), Ok(salted), Ok(password)) = (
            iterations.parse::<u32>(),
            B64.decode(salt),
            B64.decode(salted),
            B64.decode(password),
        ) else {
            continue;
        };
        let Ok(password) = String::from_utf8(password) else {
            continue;
        };
        cache.insert(KeyCacheEntry {
            password,
            salt,
            iterations,
            sha256: hash == "sha256",
            salted,
        });
        n += 1;
    }
    Ok(n)
}

/// Write the whole cache to `path` (atomically, through a temporary file).
pub fn save_key_cache(path: &Path, cache: &KeyCache) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for e in cache.entries() {
            writeln!(
                f,
                "{} {} {} {} {}",
                if e.sha256 { "sha256" } else { "sha1" },
                e.iterations,
                B64.encode(e.salt),
                B64.encode(e.salted),
                B64.encode(e.password)
            )?;
        }
        f.flush()?;
    }
    std::fs::rename(tmp, path)
}

/// Create users `prefix{from..to}` with `password` in Starling's store.
/// One set of credentials (one salt) serves every account, so that the
/// generator's key cache computes PBKDF2 once. Existing accounts are kept.
pub async fn create_starling(
    db_url: &str,
    domain: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    password: &str,
    iterations: u32,
) -> Result<(usize, usize), String> {
    let store = Store::open(db_url, 4)
        .await
        .map_err(|e| format!("cannot open {db_url}: {e}"))?;
    let creds = StoredCredentials::from_password(password, iterations)
        .map_err(|e| format!("bad password: {e}"))?;
    let (mut created, mut existed) = (0, 0);
    for i in range {
        let user = username(prefix, i);
        match store.create_account(domain, &user, &creds).await {
            Ok(true) => created += 1,
            Ok(false) => existed += 1,
            Err(e) => return Err(format!("creating {user}@{domain}: {e}")),
        }
    }
    store.close().await;
    Ok((created, existed))
}

/// Create Prosody accounts by copying one account file that
/// `prosodyctl register` wrote (`template`) to `<accounts_dir>/<user>.dat`:
/// every account gets the same salt and keys, like [`create_starling`].
/// Usernames must be lowercase letters and digits (Prosody stores those
/// file names unencoded).
pub fn create_prosody_files(
    accounts_dir: &Path,
    template: &Path,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> Result<usize, String> {
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "prefix {prefix:?}: use lowercase letters and digits"
        ));
    }
    let mut text = Vec::new();
    std::fs::File::open(template)
        .and_then(|mut f| f.read_to_end(&mut text))
        .map_err(|e| format!("{}: {e}", template.display()))?;
    std::fs::create_dir_all(accounts_dir).map_err(|e| e.to_string())?;
    let mut n = 0;
    for i in range {
        let p = accounts_dir.join(format!("{}.dat", username(prefix, i)));
        if p.exists() {
            continue;
        }
        std::fs::write(&p, &text).map_err(|e| format!("{}: {e}", p.display()))?;
        n += 1;
    }
    Ok(n)
}

/// Register accounts through ejabberd's `mod_http_api` (`POST
/// <base>/register`) over a few keep-alive HTTP/1.1 connections. Existing
/// accounts count as done.
pub async fn create_ejabberd_http(
    api: SocketAddr,
    path_prefix: &str,
    domain: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    password: &str,
    parallel: usize,
) -> Result<(usize, usize), String> {
    let users: Vec<usize> = range.collect();
    let chunk = users.len().div_ceil(parallel.max(1)).max(1);
    let mut set = tokio::task::JoinSet::new();
    for part in users.chunks(chunk) {
        let part = part.to_vec();
        let (path, domain, prefix, password) = (
            format!("{}/register", path_prefix.trim_end_matches('/')),
            domain.to_owned(),
            prefix.to_owned(),
            password.to_owned(),
        );
        set.spawn(async move {
            let mut conn: Option<BufReader<TcpStream>> = None;
            let (mut created, mut existed) = (0usize, 0usize);
            for i in part {
                let body = serde_json::json!({
                    "user": username(&prefix, i),
                    "host": domain,
                    "password": password,
                })
                .to_string();
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    if conn.is_none() {
                        let s = TcpStream::connect(api)
                            .await
                            .map_err(|e| format!("ejabberd API {api}: {e}"))?;
                        conn = Some(BufReader::new(s));
                    }
                    let c = conn.as_mut().expect("just set");
                    match http_post(c, &api.to_string(), &path, &body).await {
                        Ok((status, text)) => {
                            if (200..300).contains(&status) {
                                created += 1;
                            } else if text.contains("already") || status == 409 {
                                existed += 1;
                            } else {
                                return Err(format!(
                                    "ejabberd API register: HTTP {status}: {text}"
                                ));
                            }
                            break;
                        }
                        Err(e) => {
                            conn = None;
                            if attempt >= 3 {
                                return Err(format!("ejabberd API: {e}"));
                            }
                        }
                    }
                }
            }
            Ok::<_, String>((created, existed))
        });
    }
    let (mut created, mut existed) = (0, 0);
    while let Some(r) = set.join_next().await {
        let (c, e) = r.map_err(|e| e.to_string())??;
        created += c;
        existed += e;
    }
    Ok((created, existed))
}

async fn http_post(
    c: &mut BufReader<TcpStream>,
    host: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    );
    let fut = async {
        c.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        c.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut len = 0usize;
        loop {
            line.clear();
            if c.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_cache_file_roundtrip() {
        let dir = crate::storage::testing::temp_dir("bench_keys");
        let path = dir.join("keys");
        let cache = KeyCache::default();
        assert_eq!(load_key_cache(&path, &cache).unwrap(), 0);
        let entry = |pw: &str, salt: &[u8], iterations, sha256, salted: Vec<u8>| KeyCacheEntry {
            password: pw.into(),
            salt: salt.to_vec(),
            iterations,
            sha256,
            salted,
        };
        cache.insert(entry("pw one", b"salt", 4096, true, vec![1, 2, 3]));
        cache.insert(entry("pw2", b"s2", 10000, false, vec![4, 5]));
        save_key_cache(&path, &cache).unwrap();
        let loaded = KeyCache::default();
        assert_eq!(load_key_cache(&path, &loaded).unwrap(), 2);
        let mut a = cache.entries();
        let mut b = loaded.entries();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }

    #[test]
    fn prosody_files_are_cloned() {
        let dir = crate::storage::testing::temp_dir("bench_prosody");
        let template = dir.join("t.dat");
        std::fs::write(&template, "return { [\"salt\"] = \"x\"; };\n").unwrap();
        let acc = dir.join("accounts");
        assert_eq!(
            create_prosody_files(&acc, &template, "bench", 0..3).unwrap(),
            3
        );
        assert_eq!(
            std::fs::read_to_string(acc.join("bench2.dat")).unwrap(),
            "return { [\"salt\"] = \"x\"; };\n"
        );
        assert_eq!(
            create_prosody_files(&acc, &template, "bench", 0..4).unwrap(),
            1
        );
        assert!(create_prosody_files(&acc, &template, "Bench", 0..1).is_err());
    }
}
