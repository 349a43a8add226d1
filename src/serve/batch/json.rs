//! A narinfo as one line of a `GetNarInfosV1` answer: the store object
//! info JSON, version 2, "NAR info" variant (NixOS/nix
//! `protocols/json/schema/store-object-info-v2.yaml`), plus the `path`
//! field the batch protocol adds. Pure.
//!
//! Version 2 conventions: store paths are basenames (`<hash>-<name>`,
//! with `storeDir` alongside), hashes are SRI strings (`sha256-<base64>`),
//! `ca` is `null` or `{method, hash}`. Fields a binary cache cannot know
//! (`registrationTime`, `lastUsageTime`) are `null`, `ultimate` is false.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::proto::narinfo::{parse_hash, NarInfo};
use crate::proto::store_path::STORE_DIR;

/// Nix's reading of a narinfo without `Compression:`.
const DEFAULT_COMPRESSION: &str = "bzip2";

/// One NDJSON line (with its `\n`); `None` if the narinfo's `NarHash` or
/// store path cannot be expressed (it could not have passed parsing).
pub fn line(info: &NarInfo) -> Option<String> {
    let path = info.store_path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let mut obj = Map::with_capacity(16);
    obj.insert("path".into(), json!(path));
    obj.insert("version".into(), json!(2));
    obj.insert("storeDir".into(), json!(STORE_DIR));
    obj.insert("narHash".into(), json!(sri(&info.nar_hash)?));
    obj.insert("narSize".into(), json!(info.nar_size));
    obj.insert("references".into(), json!(info.references));
    obj.insert("ca".into(), info.ca.as_deref().map_or(Value::Null, ca));
    obj.insert("deriver".into(), json!(info.deriver));
    obj.insert("registrationTime".into(), Value::Null);
    obj.insert("lastUsageTime".into(), Value::Null);
    obj.insert("ultimate".into(), json!(false));
    obj.insert("signatures".into(), json!(info.sigs));
    obj.insert("url".into(), json!(info.url));
    let compression = info.compression.as_deref().unwrap_or(DEFAULT_COMPRESSION);
    obj.insert("compression".into(), json!(compression));
    if let Some(h) = info.file_hash.as_deref().and_then(sri) {
        obj.insert("downloadHash".into(), json!(h));
    }
    if let Some(n) = info.file_size {
        obj.insert("downloadSize".into(), json!(n));
    }
    let mut out = Value::Object(obj).to_string();
    out.push('\n');
    Some(out)
}

/// `sha256:<any encoding>` → `sha256-<base64>`.
fn sri(hash: &str) -> Option<String> {
    let (algo, digest) = parse_hash(hash)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
    Some(format!("{algo}-{b64}"))
}

/// A narinfo `CA:` value as the structured v2 content address. A form this
/// does not know is passed through as the string it was (version 1 style)
/// rather than dropped: `null` would claim the path is input-addressed.
fn ca(raw: &str) -> Value {
    let structured =
        |method: &str, hash: &str| sri(hash).map(|h| json!({ "method": method, "hash": h }));
    let parsed = if let Some(h) = raw.strip_prefix("text:") {
        structured("text", h)
    } else if let Some(h) = raw.strip_prefix("fixed:r:") {
        structured("nar", h)
    } else if let Some(h) = raw.strip_prefix("fixed:git:") {
        structured("git", h)
    } else if let Some(h) = raw.strip_prefix("fixed:") {
        structured("flat", h)
    } else {
        None
    };
    parsed.unwrap_or_else(|| json!(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Nix 2.8 `nix copy --to file://` (the harness's build).
    const NARINFO: &str = "StorePath: /nix/store/2fm1sqz6wgmsbrp89lvl9kdxxw610dnb-ncro-logtest-1
URL: nar/1vgmvfyvffw7k28zfqwvba7nsxkpwbggkgk8mq71fsgdv4147qc2.nar.xz
Compression: xz
FileHash: sha256:1vgmvfyvffw7k28zfqwvba7nsxkpwbggkgk8mq71fsgdv4147qc2
FileSize: 124
NarHash: sha256:0hkbia1003qqh0r7fn03drzx5yaw7yp99xs7j6c7qsddnp1w7dpc
NarSize: 120
References: 
Deriver: l2g9xjgs9ma4cia51w7yhsjdanyx4mnc-ncro-logtest-1.drv
Sig: t1:u0QsqHRliWLvGmBx7yjT9rWlL4sejKGF+yOyDOVJEJv5kN3r7uRNvWpuJtwcMexxwIWDST27MyXLaWDCjV1tBQ==
";

    fn parsed(line: &str) -> Value {
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        serde_json::from_str(line).expect("valid JSON")
    }

    #[test]
    fn input_addressed_path() {
        let info = NarInfo::parse(NARINFO.as_bytes()).expect("parses");
        let v = parsed(&line(&info).expect("renders"));
        assert_eq!(v["path"], "2fm1sqz6wgmsbrp89lvl9kdxxw610dnb-ncro-logtest-1");
        assert_eq!(v["version"], 2);
        assert_eq!(v["storeDir"], "/nix/store");
        // Same digest, re-encoded: nix32 -> base64.
        let (_, digest) = parse_hash("sha256:0hkbia1003qqh0r7fn03drzx5yaw7yp99xs7j6c7qsddnp1w7dpc")
            .expect("hash");
        let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
        assert_eq!(v["narHash"], format!("sha256-{b64}"));
        assert_eq!(v["narSize"], 120);
        assert_eq!(v["references"], json!([]));
        assert_eq!(v["ca"], Value::Null);
        assert_eq!(
            v["deriver"],
            "l2g9xjgs9ma4cia51w7yhsjdanyx4mnc-ncro-logtest-1.drv"
        );
        assert_eq!(v["signatures"][0], info.sigs[0]);
        assert_eq!(v["url"], info.url);
        assert_eq!(v["compression"], "xz");
        assert_eq!(v["downloadSize"], 124);
        assert!(v["downloadHash"]
            .as_str()
            .is_some_and(|h| h.starts_with("sha256-")));
        assert_eq!(v["ultimate"], false);
    }

    #[test]
    fn content_addresses_are_structured() {
        let nix32 = "sha256:0hkbia1003qqh0r7fn03drzx5yaw7yp99xs7j6c7qsddnp1w7dpc";
        let method = |raw: &str| ca(raw)["method"].as_str().map(str::to_owned);
        assert_eq!(method(&format!("fixed:r:{nix32}")).as_deref(), Some("nar"));
        assert_eq!(method(&format!("fixed:{nix32}")).as_deref(), Some("flat"));
        assert_eq!(method(&format!("text:{nix32}")).as_deref(), Some("text"));
        assert!(ca(&format!("text:{nix32}"))["hash"]
            .as_str()
            .is_some_and(|h| h.starts_with("sha256-")));
        assert_eq!(ca("weird:thing"), json!("weird:thing"));
    }

    #[test]
    fn missing_optional_fields() {
        let text = NARINFO
            .lines()
            .filter(|l| !l.starts_with("Compression") && !l.starts_with("File"))
            .filter(|l| !l.starts_with("Deriver"))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        let info = NarInfo::parse(text.as_bytes()).expect("parses");
        let v = parsed(&line(&info).expect("renders"));
        assert_eq!(v["compression"], "bzip2");
        assert_eq!(v["deriver"], Value::Null);
        assert!(v.get("downloadHash").is_none() && v.get("downloadSize").is_none());
    }
}
