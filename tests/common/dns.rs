//! A tiny authoritative DNS server for tests (UDP on 127.0.0.1, random
//! port): SRV and A records set by the test, NXDOMAIN for every other name.
//! Point `s2s.resolver` at it to exercise real SRV resolution.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

#[derive(Default)]
struct Zone {
    srv: HashMap<String, Vec<(u16, u16, u16, String)>>,
    addrs: HashMap<String, Vec<IpAddr>>,
    /// Every question asked: (name, type).
    asked: Vec<(String, RecordType)>,
}

pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: tokio::task::JoinHandle<()>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestDns {
    pub async fn start() -> TestDns {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let z = zone.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let resp = answer(&z, &req);
                if let Ok(bytes) = resp.to_vec() {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
        });
        TestDns { addr, zone, task }
    }

    /// The `s2s.resolver` value for this server.
    pub fn resolver(&self) -> String {
        self.addr.to_string()
    }

    pub fn srv(&self, name: &str, priority: u16, weight: u16, port: u16, target: &str) {
        self.zone
            .lock()
            .unwrap()
            .srv
            .entry(key(name))
            .or_default()
            .push((priority, weight, port, target.to_owned()));
    }

    pub fn addr(&self, host: &str, ip: IpAddr) {
        self.zone
            .lock()
            .unwrap()
            .addrs
            .entry(key(host))
            .or_default()
            .push(ip);
    }

    /// `_xmpp-server._tcp.<domain>` -> `xmpp.<domain>:<port>` -> 127.0.0.1.
    pub fn server(&self, domain: &str, port: u16) {
        let host = format!("xmpp.{domain}");
        self.srv(&format!("_xmpp-server._tcp.{domain}"), 0, 5, port, &host);
        self.addr(&host, "127.0.0.1".parse().unwrap());
    }

    /// Was this name asked for with this record type ("SRV", "A", "AAAA")?
    pub fn was_asked(&self, name: &str, record_type: &str) -> bool {
        self.zone
            .lock()
            .unwrap()
            .asked
            .iter()
            .any(|(n, t)| *n == key(name) && t.to_string() == record_type)
    }

    pub fn clear(&self, name: &str) {
        let mut z = self.zone.lock().unwrap();
        z.srv.remove(&key(name));
        z.addrs.remove(&key(name));
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(zone: &Mutex<Zone>, req: &Message) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.message_type = MessageType::Response;
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    let mut z = zone.lock().unwrap();
    for q in &req.queries {
        z.asked.push((key(&q.name.to_ascii()), q.query_type));
    }
    let mut known = false;
    for q in &req.queries {
        resp.add_query(q.clone());
        let k = key(&q.name.to_ascii());
        match q.query_type {
            RecordType::SRV => {
                if let Some(v) = z.srv.get(&k) {
                    known = true;
                    for (p, w, port, target) in v {
                        let t = Name::from_ascii(format!("{}.", target.trim_end_matches('.')))
                            .unwrap_or_else(|_| Name::root());
                        resp.add_answer(Record::from_rdata(
                            q.name.clone(),
                            5,
                            RData::SRV(SRV::new(*p, *w, *port, t)),
                        ));
                    }
                }
            }
            RecordType::A | RecordType::AAAA => {
                if let Some(v) = z.addrs.get(&k) {
                    known = true;
                    for ip in v {
                        match (ip, q.query_type) {
                            (IpAddr::V4(a), RecordType::A) => {
                                resp.add_answer(Record::from_rdata(
                                    q.name.clone(),
                                    5,
                                    RData::A(A(*a)),
                                ));
                            }
                            (IpAddr::V6(a), RecordType::AAAA) => {
                                resp.add_answer(Record::from_rdata(
                                    q.name.clone(),
                                    5,
                                    RData::AAAA(AAAA(*a)),
                                ));
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
        if z.srv.contains_key(&k) || z.addrs.contains_key(&k) {
            known = true;
        }
    }
    resp.metadata.response_code = if known {
        ResponseCode::NoError
    } else {
        ResponseCode::NXDomain
    };
    resp
}
