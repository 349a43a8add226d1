//! The real corpus (`../shared/realdata`: ~1,000 narinfos from public test
//! suites, most signed by cache.nixos.org-1) through the real `ncro`
//! binary: a fake upstream serves the files byte for byte, ncro trusts the
//! public keys in `keys.txt`, and every answer is checked against what the
//! corpus's manifest says the file should verify to.

use std::collections::BTreeMap;
use std::path::Path;

use crate::fake::FakeUpstream;
use crate::harness::{HttpConn, NcroProcess};

/// One narinfo of the corpus and what the manifest says of it.
struct Entry {
    file: String,
    body: Vec<u8>,
    hash: String,
    /// A signature by a key in `keys.txt` verifies (manifest `status: ok`).
    signed_ok: bool,
    /// Has a `CA:` field (the corpus's CA paths all prove their store path).
    ca: bool,
    tags: Vec<String>,
}

/// The file whose references are out of order: signed over the unsorted
/// list, so Nix (which sorts them) rejects its signature; the manifest
/// marks it `ok` (realdata/README.md explains).
const OUT_OF_ORDER: &str = "references_out_of_order";

impl Entry {
    fn should_serve(&self) -> bool {
        (self.signed_ok && !self.file.contains(OUT_OF_ORDER)) || self.ca
    }
}

/// The public keys of `keys.txt` (read by the parent module), in Nix's
/// `name:base64` form for the config.
fn public_keys(dir: &Path) -> Vec<String> {
    super::trusted_keys(dir)
        .iter()
        .map(|k| k.to_nix_string())
        .collect()
}

fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.strip_prefix(' ').unwrap_or(v))
}

fn corpus(dir: &Path, trusted: &[String]) -> Vec<Entry> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("manifest.json parses");
    let trusted_names: Vec<&str> = trusted.iter().filter_map(|k| k.split(':').next()).collect();
    let mut out = Vec::new();
    for e in manifest.as_array().expect("manifest is a list") {
        if e["kind"] != "narinfo" {
            continue;
        }
        let file = e["file"].as_str().expect("file").to_owned();
        let body = std::fs::read(dir.join(&file)).expect("read narinfo");
        let text = String::from_utf8(body.clone()).expect("utf-8 narinfo");
        let store_path = field(&text, "StorePath").expect("StorePath");
        let hash = store_path["/nix/store/".len()..][..32].to_owned();
        let sigs = e["verify"]["sigs"].as_array().cloned().unwrap_or_default();
        let signed_ok = sigs.iter().any(|s| {
            s["status"] == "ok"
                && s["key"]
                    .as_str()
                    .is_some_and(|k| trusted_names.contains(&k))
        });
        let tags = e["tags"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Entry {
            ca: field(&text, "CA").is_some(),
            file,
            body,
            hash,
            signed_ok,
            tags,
        });
    }
    out
}

/// Splits entries into rounds with at most one file per store hash (the
/// corpus holds several variants of some paths; one upstream serves one).
fn rounds(entries: &[Entry]) -> Vec<Vec<&Entry>> {
    let mut by_hash: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        by_hash.entry(&e.hash).or_default().push(e);
    }
    let depth = by_hash.values().map(Vec::len).max().unwrap_or(0);
    (0..depth)
        .map(|r| by_hash.values().filter_map(|v| v.get(r).copied()).collect())
        .collect()
}

/// ncro in front of `upstream` trusting `keys`; narinfo `URL:`s kept (the
/// upstream's bytes are served), except where [`config_with_mode`] says.
fn config(upstream: &str, keys: &[String]) -> String {
    config_with_mode(upstream, keys, "keep")
}

fn config_with_mode(upstream: &str, keys: &[String], nar_url_mode: &str) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let keys: Vec<String> = keys.iter().map(|k| q(k)).collect();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstreams]]\nurl = {}\npriority = 10\npublic_keys = [{}]\nnar_url_mode = {}\n\n\
         [cache]\ndb_path = \":memory:\"\n\n\
         [health]\nprobe_interval = \"1h\"\n\n\
         [logging]\nlevel = \"info\"\nformat = \"text\"\n",
        q(upstream),
        keys.join(", "),
        q(nar_url_mode)
    )
}

/// What a client must receive for an accepted narinfo: the upstream's
/// bytes, with a final newline added where the file had none (Nix calls
/// such a narinfo corrupt; docs/endpoints.md lists the rewrites).
fn expected_body(body: &[u8]) -> Vec<u8> {
    let mut want = body.to_vec();
    if !want.ends_with(b"\n") {
        want.push(b'\n');
    }
    want
}

#[test]
fn every_real_narinfo_is_answered_as_nix_would_judge_it() {
    let Some(dir) = super::corpus() else { return };
    let keys = public_keys(&dir);
    assert_eq!(keys.len(), 4, "keys.txt lists four public keys: {keys:?}");
    let entries = corpus(&dir, &keys);
    assert_eq!(entries.len(), 1019, "narinfos in the manifest");
    let (mut served, mut refused, mut no_newline) = (0, 0, 0);
    let mut big_seen = false;
    for round in rounds(&entries) {
        let mut fake = FakeUpstream::builder().cache_info(40);
        for e in &round {
            fake = fake.narinfo(&e.hash, e.body.clone());
        }
        let fake = fake.start();
        let ncro = NcroProcess::start(&config(&fake.url(), &keys));
        let mut conn = HttpConn::connect(ncro.addr()).expect("connect to ncro");
        for e in &round {
            let r = conn
                .get(&format!("/{}.narinfo", e.hash))
                .unwrap_or_else(|err| panic!("{}: {err}", e.file));
            if e.should_serve() {
                assert_eq!(r.status, 200, "{} must be served: {}", e.file, r.text());
                assert_eq!(
                    r.body,
                    expected_body(&e.body),
                    "{}: the client gets the upstream's bytes",
                    e.file
                );
                served += 1;
                no_newline += usize::from(!e.body.ends_with(b"\n"));
                big_seen |= e.body.len() > 200_000;
                // Fields the parser does not know reach the client.
                if e.tags.iter().any(|t| t.starts_with("System:")) {
                    assert!(r.text().contains("\nSystem: "), "{}", e.file);
                }
            } else {
                assert_ne!(r.status, 200, "{} must not be served", e.file);
                assert_ne!(r.status, 404, "{}: a refused narinfo is no miss", e.file);
                refused += 1;
            }
        }
        drop(conn);
        drop(ncro);
    }
    eprintln!(
        "real corpus: {served} served, {refused} refused, {no_newline} given a final newline"
    );
    assert!(big_seen, "the 207 KB texlive narinfo was served");
    // Served: every file with a valid signature by a key in keys.txt, or a
    // CA that proves its path, less the out-of-order one. Refused: the two
    // tampered go-nix variants, the three unsigned nix-casync files, the
    // unsigned attic one and the out-of-order one.
    assert_eq!((served, refused), (1012, 7));
    assert_eq!(no_newline, 18, "all ncps files lack a final newline");
}

#[test]
fn forged_content_addresses_are_never_served() {
    let Some(dir) = super::corpus() else { return };
    let keys = public_keys(&dir);
    let entries = corpus(&dir, &keys);
    // Every narinfo cache.nixos.org signed, with its signatures dropped and
    // a CA added that names some other content.
    let forged: Vec<(String, Vec<u8>)> = entries
        .iter()
        .filter(|e| e.signed_ok && !e.ca)
        .map(|e| {
            let text = String::from_utf8(e.body.clone()).unwrap();
            let mut out: String = text
                .lines()
                .filter(|l| !l.starts_with("Sig:"))
                .map(|l| format!("{l}\n"))
                .collect();
            out.push_str(
                "CA: fixed:r:sha256:1b26xkfi12a87bd8yhnq5mhf6g52d7hb0b5sh63n5bmcg7alb5nk\n",
            );
            (e.hash.clone(), out.into_bytes())
        })
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    assert!(forged.len() >= 900, "forged {} narinfos", forged.len());
    let mut fake = FakeUpstream::builder().cache_info(40);
    for (hash, body) in &forged {
        fake = fake.narinfo(hash, body.clone());
    }
    let fake = fake.start();
    let ncro = NcroProcess::start(&config(&fake.url(), &keys));
    let mut conn = HttpConn::connect(ncro.addr()).expect("connect");
    for (hash, _) in &forged {
        let r = conn.get(&format!("/{hash}.narinfo")).expect("answer");
        assert_eq!(r.status, 502, "forged CA for {hash} must be refused");
    }
    let metrics = conn.get("/metrics").expect("metrics").text();
    let bad: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ncro_narinfo_bad_signatures_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("ncro_narinfo_bad_signatures_total");
    assert_eq!(
        bad as usize,
        forged.len(),
        "each counted as a bad signature"
    );
}

#[test]
fn real_nar_bodies_are_relayed_byte_exact() {
    let Some(dir) = super::corpus() else { return };
    let mut nars = Vec::new();
    for sub in ["go-nix", "attic", "nix-casync"] {
        for f in std::fs::read_dir(dir.join("nar").join(sub)).expect("nar dir") {
            let p = f.expect("entry").path();
            if p.extension().is_some_and(|e| e == "nar") {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                nars.push((format!("/nar/{name}"), std::fs::read(&p).expect("read nar")));
            }
        }
    }
    assert!(nars.len() >= 8, "NAR files found: {}", nars.len());
    let mut fake = FakeUpstream::builder().cache_info(40);
    for (path, bytes) in &nars {
        fake = fake.file(path, bytes.clone());
    }
    let fake = fake.start();
    let ncro = NcroProcess::start(&config(&fake.url(), &public_keys(&dir)));
    let mut conn = HttpConn::connect(ncro.addr()).expect("connect");
    for (path, bytes) in &nars {
        let r = conn.get(path).expect("NAR answer");
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body == *bytes, "{path}: relayed bytes differ");
    }
}

/// Every served narinfo of the first round, under each `nar_url_mode`:
/// only the `URL:` line differs from the upstream's bytes (so the
/// signatures still verify), and it is what the mode says. Asked twice,
/// so a route-cache hit serves the same bytes as the race that stored it.
#[test]
fn real_narinfos_get_the_url_line_their_mode_says() {
    let Some(dir) = super::corpus() else { return };
    let keys = public_keys(&dir);
    let entries = corpus(&dir, &keys);
    let round: Vec<&Entry> = rounds(&entries)
        .swap_remove(0)
        .into_iter()
        .filter(|e| e.should_serve())
        .collect();
    assert!(round.len() > 500, "{} narinfos", round.len());
    let mut fake = FakeUpstream::builder().cache_info(40);
    for e in &round {
        fake = fake.narinfo(&e.hash, e.body.clone());
    }
    let fake = fake.start();
    let mut rewritten = 0;
    for mode in ["keep", "to_self", "to_upstream"] {
        let ncro = NcroProcess::start(&config_with_mode(&fake.url(), &keys, mode));
        let mut conn = HttpConn::connect(ncro.addr()).expect("connect to ncro");
        for e in &round {
            let text = String::from_utf8(expected_body(&e.body)).expect("utf-8");
            let url = field(&text, "URL").expect("URL");
            let absolute = url.starts_with("http://") || url.starts_with("https://");
            let served_url = match mode {
                _ if absolute => url.to_owned(),
                "keep" => url.to_owned(),
                "to_self" => {
                    let name = url.split('?').next().unwrap().rsplit('/').next().unwrap();
                    let ext = name.find(".nar").map_or("", |i| &name[i..]);
                    format!("nar/{}{ext}", e.hash)
                }
                _ => format!("{}/{}", fake.url(), url.trim_start_matches('/')),
            };
            let want: String = text
                .lines()
                .map(|l| match l.strip_prefix("URL:") {
                    Some(_) => format!("URL: {served_url}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            for _ in 0..2 {
                let r = conn
                    .get(&format!("/{}.narinfo", e.hash))
                    .unwrap_or_else(|err| panic!("{}: {err}", e.file));
                assert_eq!(r.status, 200, "{mode} {}", e.file);
                assert_eq!(r.text(), want, "{mode} {}", e.file);
            }
            rewritten += usize::from(served_url != url);
        }
    }
    assert!(rewritten > 1000, "{rewritten} URL lines rewritten");
}
