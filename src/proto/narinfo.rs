//! The `<hash>.narinfo` format: parse, fingerprint, relay and render.
//!
//! The parser accepts the variations caches write (no space after `:`, an
//! empty `References:`, empty lines, unknown keys, no final newline) and is
//! strict where passing a narinfo on would break a client or a signature
//! check: required keys, store path syntax, hash syntax, sizes, duplicates
//! and carriage returns (a CRLF narinfo makes Nix fail with "store path
//! contains illegal character").
//!
//! Nix itself is stricter than this parser. Measured with Nix 2.8: it takes
//! each value from two bytes after the `:`, so `URL:nar/x` reads as URL
//! `ar/x`; `References:` with no space swallows the next line and fails;
//! a missing final newline is "corrupt"; an empty line glues itself to the
//! next key's name, so Nix ignores that line. What ncro serves is
//! therefore [`relay_form`]: the upstream's bytes as received, every line
//! and field kept (unknown ones such as `System:` too), with only those
//! lines rewritten that Nix would misread (docs/endpoints.md lists the
//! rewrites).

mod nar_url;

pub use nar_url::{
    canonical_request, is_absolute, nar_ext, same_file, served_url, FileMismatch, NarUrlMode,
};

use super::base32;
use super::store_path::{name_of, StoreHash, HASH_LEN, STORE_DIR};
use base64::Engine as _;
use std::borrow::Cow;
use thiserror::Error;

/// Largest narinfo body accepted. Most are under 4 KiB, but real ones
/// reach hundreds of KiB (cache.nixos.org's `texlive-combined-full`: 207 KB,
/// 3,691 references), and Nix itself has no limit; 4 MiB is 20 times the
/// largest seen, and still keeps a hostile upstream from making us buffer
/// without bound.
pub const MAX_NARINFO_SIZE: usize = 4 * 1024 * 1024;

/// Longest store path name Nix accepts.
const MAX_NAME_LEN: usize = 211;

/// A parsed narinfo. Field values are exactly what the file said (after
/// the separator), except that empty optional values read as `None` and a
/// `Deriver: unknown-deriver` reads as `None`, as in Nix.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NarInfo {
    pub store_path: String,
    pub url: String,
    pub compression: Option<String>,
    pub file_hash: Option<String>,
    pub file_size: Option<u64>,
    pub nar_hash: String,
    pub nar_size: u64,
    /// Store path basenames (`<hash>-<name>`), in file order.
    pub references: Vec<String>,
    /// A basename, like the references.
    pub deriver: Option<String>,
    /// Raw `Sig:` values (`<key name>:<base64>`), one per line.
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarInfoError {
    #[error("narinfo is {0} bytes, over the {MAX_NARINFO_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("narinfo contains a carriage return (CRLF narinfos break Nix clients)")]
    CarriageReturn,
    #[error("narinfo is not valid UTF-8")]
    NotUtf8,
    #[error("narinfo line {0} has no ':'")]
    MalformedLine(usize),
    #[error("narinfo line {line}: duplicate {key}")]
    Duplicate { key: &'static str, line: usize },
    #[error("narinfo has no {0}")]
    Missing(&'static str),
    #[error("narinfo line {line}: invalid {key}: {why}")]
    Invalid {
        key: &'static str,
        line: usize,
        why: &'static str,
    },
}

/// The keys the parser knows. Each maps to one bit of the duplicate mask.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    StorePath,
    Url,
    Compression,
    FileHash,
    FileSize,
    NarHash,
    NarSize,
    References,
    Deriver,
    Sig,
    Ca,
}

impl Key {
    fn from_name(name: &str) -> Option<Key> {
        Some(match name {
            "StorePath" => Key::StorePath,
            "URL" => Key::Url,
            "Compression" => Key::Compression,
            "FileHash" => Key::FileHash,
            "FileSize" => Key::FileSize,
            "NarHash" => Key::NarHash,
            "NarSize" => Key::NarSize,
            "References" => Key::References,
            "Deriver" => Key::Deriver,
            "Sig" => Key::Sig,
            "CA" => Key::Ca,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Key::StorePath => "StorePath",
            Key::Url => "URL",
            Key::Compression => "Compression",
            Key::FileHash => "FileHash",
            Key::FileSize => "FileSize",
            Key::NarHash => "NarHash",
            Key::NarSize => "NarSize",
            Key::References => "References",
            Key::Deriver => "Deriver",
            Key::Sig => "Sig",
            Key::Ca => "CA",
        }
    }
}

/// Accumulates fields while lines are read; `finish` checks the required ones.
#[derive(Default)]
struct Partial<'a> {
    seen: u16,
    store_path: Option<&'a str>,
    url: Option<&'a str>,
    nar_hash: Option<&'a str>,
    nar_size: Option<u64>,
    info: NarInfo,
}

impl<'a> Partial<'a> {
    fn set(&mut self, key: Key, value: &'a str, line: usize) -> Result<(), NarInfoError> {
        if key == Key::Sig {
            if !value.is_empty() {
                self.info.sigs.push(value.to_owned());
            }
            return Ok(());
        }
        let bit = 1u16 << key as u16;
        if self.seen & bit != 0 {
            return Err(NarInfoError::Duplicate {
                key: key.name(),
                line,
            });
        }
        self.seen |= bit;
        self.apply(key, value).map_err(|why| NarInfoError::Invalid {
            key: key.name(),
            line,
            why,
        })
    }

    /// Stores one single-valued field; the error says what is wrong with it.
    fn apply(&mut self, key: Key, value: &'a str) -> Result<(), &'static str> {
        let info = &mut self.info;
        match key {
            Key::StorePath if is_store_path(value) => self.store_path = Some(value),
            Key::StorePath => return Err("not a /nix/store/<hash>-<name> path"),
            Key::Url if !value.is_empty() => self.url = Some(value),
            Key::Url => return Err("empty"),
            Key::NarHash if parse_hash(value).is_some() => self.nar_hash = Some(value),
            Key::NarHash => return Err("not a recognised hash"),
            Key::NarSize => match parse_u64(value) {
                Some(0) => return Err("zero"),
                Some(n) => self.nar_size = Some(n),
                None => return Err("not a number in u64 range"),
            },
            Key::FileSize => info.file_size = Some(parse_u64(value).ok_or("not a u64")?),
            Key::References => info.references = parse_references(value).ok_or("bad basename")?,
            Key::Deriver => info.deriver = parse_deriver(value).ok_or("bad basename")?,
            Key::Compression => info.compression = non_empty(value),
            Key::FileHash => info.file_hash = non_empty(value),
            Key::Ca => info.ca = non_empty(value),
            // Repeatable; handled by `set` before the duplicate check.
            Key::Sig => {}
        }
        Ok(())
    }

    fn finish(self) -> Result<NarInfo, NarInfoError> {
        let missing = NarInfoError::Missing;
        let store_path = self.store_path.ok_or(missing("StorePath"))?;
        let url = self.url.ok_or(missing("URL"))?;
        let nar_hash = self.nar_hash.ok_or(missing("NarHash"))?;
        let nar_size = self.nar_size.ok_or(missing("NarSize"))?;
        Ok(NarInfo {
            store_path: store_path.to_owned(),
            url: url.to_owned(),
            nar_hash: nar_hash.to_owned(),
            nar_size,
            ..self.info
        })
    }
}

impl NarInfo {
    /// Parses a narinfo body. A `StorePath` that differs from the hash that
    /// was requested is the caller's to check (see [`NarInfo::store_hash`]).
    pub fn parse(bytes: &[u8]) -> Result<NarInfo, NarInfoError> {
        if bytes.len() > MAX_NARINFO_SIZE {
            return Err(NarInfoError::TooLarge(bytes.len()));
        }
        if bytes.contains(&b'\r') {
            return Err(NarInfoError::CarriageReturn);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| NarInfoError::NotUtf8)?;
        let mut partial = Partial::default();
        for (idx, line) in text.split('\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let line_no = idx + 1;
            let (name, value) = line
                .split_once(':')
                .ok_or(NarInfoError::MalformedLine(line_no))?;
            // Unknown keys are ignored, as Nix does, so newer fields pass.
            if let Some(key) = Key::from_name(name) {
                let value = value.strip_prefix(' ').unwrap_or(value);
                partial.set(key, value, line_no)?;
            }
        }
        partial.finish()
    }

    /// The hash part of `StorePath`.
    ///
    /// # Panics
    /// If `store_path` was replaced after parsing with something that is not
    /// a store path; [`NarInfo::parse`] guarantees it is one.
    pub fn store_hash(&self) -> StoreHash {
        StoreHash::from_store_path(&self.store_path)
            .expect("NarInfo::store_path is validated by parse")
    }

    /// The name part of `StorePath` (after the hash and its `-`).
    pub fn name(&self) -> &str {
        name_of(&self.store_path)
    }

    /// The string Nix signs: `1;<StorePath>;<NarHash>;<NarSize>;<refs>`.
    ///
    /// Matches Nix's `ValidPathInfo::fingerprint`: the NarHash is rendered
    /// as `<algo>:<nix-base32>` whatever encoding the file used (hex from
    /// some caches, SRI, base64), and the references are full paths,
    /// sorted and de-duplicated because Nix holds them in a set.
    pub fn fingerprint(&self) -> String {
        let mut refs: Vec<&str> = self.references.iter().map(String::as_str).collect();
        refs.sort_unstable();
        refs.dedup();
        let nar_hash = normalise_hash(&self.nar_hash);
        let refs_len: usize = refs.iter().map(|r| r.len() + STORE_DIR.len() + 2).sum();
        let mut fp = String::with_capacity(self.store_path.len() + nar_hash.len() + refs_len + 32);
        fp.push_str("1;");
        fp.push_str(&self.store_path);
        fp.push(';');
        fp.push_str(&nar_hash);
        fp.push(';');
        fp.push_str(&self.nar_size.to_string());
        fp.push(';');
        for (i, r) in refs.iter().enumerate() {
            if i > 0 {
                fp.push(',');
            }
            fp.push_str(STORE_DIR);
            fp.push('/');
            fp.push_str(r);
        }
        fp
    }

    /// Renders the narinfo the way Nix writes it: Nix's field order, `": "`
    /// separators, LF line endings, a final newline, unknown keys dropped
    /// (clients ignore them). This is the form to serve (see the module
    /// docs). `parse(render(x)) == x` for every parsed `x`. Values must not
    /// contain line breaks; parsed ones never do.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(512);
        let mut line = |key: &str, value: &str| {
            debug_assert!(
                !value.contains(['\n', '\r']),
                "{key} value has a line break"
            );
            out.push_str(key);
            out.push_str(": ");
            out.push_str(value);
            out.push('\n');
        };
        line("StorePath", &self.store_path);
        line("URL", &self.url);
        if let Some(c) = &self.compression {
            line("Compression", c);
        }
        if let Some(h) = &self.file_hash {
            line("FileHash", h);
        }
        if let Some(s) = self.file_size {
            line("FileSize", &s.to_string());
        }
        line("NarHash", &self.nar_hash);
        line("NarSize", &self.nar_size.to_string());
        line("References", &self.references.join(" "));
        if let Some(d) = &self.deriver {
            line("Deriver", d);
        }
        for sig in &self.sigs {
            line("Sig", sig);
        }
        if let Some(ca) = &self.ca {
            line("CA", ca);
        }
        out
    }
}

/// The bytes to hand a Nix client for an upstream's narinfo `body`, one
/// that [`NarInfo::parse`] accepted: the upstream's own bytes, every line
/// and field as sent, unless Nix would misread them (see the module docs).
/// Only the lines at fault change, each on its own:
///
/// - a known field written `Key:value` becomes `Key: value`, and any
///   `Key:` with nothing after it `Key: ` (Nix reads a value from two bytes
///   after the colon, so the first would lose a byte and the second would
///   swallow the next line);
/// - empty lines are dropped (Nix would ignore the line after one);
/// - a missing final newline is added (Nix calls the narinfo corrupt);
/// - with `url`, the `URL:` line's value is replaced (a configured NAR URL
///   rewrite).
///
/// Borrowed (no copy) when nothing changes, the usual case.
pub fn relay_form<'a>(body: &'a [u8], url: Option<&str>) -> Cow<'a, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    // Bytes of `body` consumed so far. This runs on every race won (twice
    // with a `URL:` rewrite): one scan for each line's end, no iterator
    // looking one line ahead.
    let mut at = 0usize;
    while at < body.len() {
        let rest = &body[at..];
        let (line, next_at, last) = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => (&rest[..end], at + end + 1, false),
            None => (rest, body.len(), true),
        };
        let fix = line_fix(line, url);
        let needs_newline = last; // no final newline
        if fix.is_none() && !needs_newline && out.is_none() {
            at = next_at;
            continue;
        }
        let buf = out.get_or_insert_with(|| {
            let mut v = Vec::with_capacity(body.len() + 16 + url.map_or(0, str::len));
            v.extend_from_slice(&body[..at]);
            v
        });
        match fix {
            None => buf.extend_from_slice(line),
            Some(LineFix::Drop) => {
                at = next_at;
                continue;
            }
            Some(LineFix::Space(colon)) => {
                buf.extend_from_slice(&line[..=colon]);
                buf.push(b' ');
                buf.extend_from_slice(&line[colon + 1..]);
            }
            Some(LineFix::Value(colon, value)) => {
                buf.extend_from_slice(&line[..=colon]);
                buf.push(b' ');
                buf.extend_from_slice(value.as_bytes());
            }
        }
        buf.push(b'\n');
        at = next_at;
    }
    match out {
        Some(v) => Cow::Owned(v),
        None => Cow::Borrowed(body),
    }
}

/// How [`relay_form`] changes one line.
enum LineFix<'u> {
    Drop,
    /// Insert a space after the colon at this offset.
    Space(usize),
    /// Replace the value after the colon at this offset.
    Value(usize, &'u str),
}

fn line_fix<'u>(line: &[u8], url: Option<&'u str>) -> Option<LineFix<'u>> {
    if line.is_empty() {
        return Some(LineFix::Drop);
    }
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    let value = &line[colon + 1..];
    let spaced = value.first() == Some(&b' ');
    if let Some(url) = url {
        if name == b"URL" {
            let current = value.strip_prefix(b" ").unwrap_or(value);
            let same = spaced && current == url.as_bytes();
            return (!same).then_some(LineFix::Value(colon, url));
        }
    }
    if spaced {
        return None; // the usual line: nothing to look up
    }
    let known = || {
        std::str::from_utf8(name)
            .ok()
            .and_then(Key::from_name)
            .is_some()
    };
    (value.is_empty() || known()).then_some(LineFix::Space(colon))
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

/// Plain decimal digits only: `u64::from_str` would also take a `+` sign,
/// which Nix's parser does not.
fn parse_u64(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Space-separated basenames; runs of spaces and an empty value are fine.
fn parse_references(value: &str) -> Option<Vec<String>> {
    value
        .split(' ')
        .filter(|r| !r.is_empty())
        .map(|r| is_basename(r).then(|| r.to_owned()))
        .collect()
}

/// `Some(None)` for an absent deriver, `None` for an invalid one.
fn parse_deriver(value: &str) -> Option<Option<String>> {
    match value {
        "" | "unknown-deriver" => Some(None),
        _ if is_basename(value) => Some(Some(value.to_owned())),
        _ => None,
    }
}

/// `/nix/store/<32 base32>-<name>` with a name Nix would accept.
fn is_store_path(path: &str) -> bool {
    path.strip_prefix(STORE_DIR)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(is_basename)
}

/// `<32 base32>-<name>`, checked the way Nix's `StorePath` constructor does.
pub fn is_basename(base: &str) -> bool {
    let Some(hash) = base.as_bytes().get(..HASH_LEN) else {
        return false;
    };
    StoreHash::parse(hash).is_some()
        && base.as_bytes().get(HASH_LEN) == Some(&b'-')
        && is_store_name(&base[HASH_LEN + 1..])
}

/// A store path name (or derivation output name) Nix would accept.
pub fn is_store_name(name: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b);
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(allowed)
        // Nix refuses names that could be mistaken for `.`/`..` path parts.
        && !matches!(name, "." | "..")
        && !name.starts_with(".-")
        && !name.starts_with("..-")
}

/// Hash algorithms Nix knows, with their digest sizes.
const HASH_ALGOS: [(&str, usize); 4] = [("md5", 16), ("sha1", 20), ("sha256", 32), ("sha512", 64)];

/// Parses `<algo>:<hex|nix32|base64>` or SRI `<algo>-<base64>`, telling the
/// digest encodings apart by length as Nix does.
pub fn parse_hash(s: &str) -> Option<(&'static str, Vec<u8>)> {
    let (algo, digest, sri) = match s.split_once(':') {
        Some((algo, digest)) => (algo, digest, false),
        None => {
            let (algo, digest) = s.split_once('-')?;
            (algo, digest, true)
        }
    };
    let &(algo, size) = HASH_ALGOS.iter().find(|(name, _)| *name == algo)?;
    let b64_len = size.div_ceil(3) * 4;
    let bytes = if sri || digest.len() == b64_len {
        base64::engine::general_purpose::STANDARD
            .decode(digest)
            .ok()?
    } else if digest.len() == size * 2 {
        hex::decode(digest).ok()?
    } else if digest.len() == base32::encoded_len(size) {
        base32::decode(digest).ok()?
    } else {
        return None;
    };
    (bytes.len() == size).then_some((algo, bytes))
}

/// `<algo>:<nix32>` for any recognised hash; anything else is returned
/// unchanged (it cannot come from `parse`, and will fail verification).
fn normalise_hash(s: &str) -> Cow<'_, str> {
    match parse_hash(s) {
        Some((algo, digest)) => Cow::Owned(format!("{algo}:{}", base32::encode(&digest))),
        None => Cow::Borrowed(s),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A narinfo written by Nix 2.8 (`nix copy --to file://…`) for the
    /// test harness's cache A; signed by `cache-a-1`.
    pub(crate) const REAL: &str = "\
StorePath: /nix/store/z3358nh04rrn2fw765nlbl8ff0w9p8cp-app-ab
URL: nar/17c7k3n58rpb2v76acz518qn3z0y23pkx9dc1plz246kgzj0jpz2.nar.xz
Compression: xz
FileHash: sha256:17c7k3n58rpb2v76acz518qn3z0y23pkx9dc1plz246kgzj0jpz2
FileSize: 284
NarHash: sha256:01772l4g95pwc0lq96idyn3q80d56wg8qs5s9dg45zc9vfgnckb4
NarSize: 616
References: l9bppir49hamiijc3hsw53yji18scbbj-lib2-ab pfwfh77pcavcf2ph6x9352sd5w707sk8-lib1-ab
Deriver: hwy49vhsvsvhksa8vpw3hwc97asbp1jk-app-ab.drv
Sig: cache-a-1:UNq1BY1CpVIYX894d71znLj/2fxo4JEJhxeFVxwkXZMPBS8ieGP+VgZnxvQ9SLi8DRFATvsyqBVVHz6QYg0SBw==
";

    const REAL_FINGERPRINT: &str = "1;/nix/store/z3358nh04rrn2fw765nlbl8ff0w9p8cp-app-ab;\
        sha256:01772l4g95pwc0lq96idyn3q80d56wg8qs5s9dg45zc9vfgnckb4;616;\
        /nix/store/l9bppir49hamiijc3hsw53yji18scbbj-lib2-ab,\
        /nix/store/pfwfh77pcavcf2ph6x9352sd5w707sk8-lib1-ab";

    /// The same NarHash in the other encodings Nix accepts
    /// (`nix-hash --to-base16`, `nix hash to-sri`).
    const HEX_HASH: &str =
        "sha256:644d669fdb89fd425e4bba688c1e37a5018487f52d9a842960fc96f40815e704";
    const SRI_HASH: &str = "sha256-ZE1mn9uJ/UJeS7pojB43pQGEh/UtmoQpYPyW9AgV5wQ=";
    const B64_HASH: &str = "sha256:ZE1mn9uJ/UJeS7pojB43pQGEh/UtmoQpYPyW9AgV5wQ=";

    const MINIMAL: &str = "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x\n\
        URL: nar/x.nar\n\
        NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
        NarSize: 5\n";

    fn parse(s: &str) -> Result<NarInfo, NarInfoError> {
        NarInfo::parse(s.as_bytes())
    }

    fn with_line(extra: &str) -> String {
        format!("{MINIMAL}{extra}\n")
    }

    fn replace_line(key: &str, line: &str) -> String {
        MINIMAL
            .lines()
            .map(|l| if l.starts_with(key) { line } else { l })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn parses_a_real_narinfo() {
        let info = parse(REAL).unwrap();
        assert_eq!(
            info.store_path,
            "/nix/store/z3358nh04rrn2fw765nlbl8ff0w9p8cp-app-ab"
        );
        assert_eq!(
            info.url,
            "nar/17c7k3n58rpb2v76acz518qn3z0y23pkx9dc1plz246kgzj0jpz2.nar.xz"
        );
        assert_eq!(info.compression.as_deref(), Some("xz"));
        assert_eq!(info.file_size, Some(284));
        assert_eq!(info.nar_size, 616);
        assert_eq!(
            info.references,
            [
                "l9bppir49hamiijc3hsw53yji18scbbj-lib2-ab",
                "pfwfh77pcavcf2ph6x9352sd5w707sk8-lib1-ab"
            ]
        );
        assert_eq!(
            info.deriver.as_deref(),
            Some("hwy49vhsvsvhksa8vpw3hwc97asbp1jk-app-ab.drv")
        );
        assert_eq!(info.sigs.len(), 1);
        assert_eq!(info.ca, None);
        assert_eq!(
            info.store_hash().as_str(),
            "z3358nh04rrn2fw765nlbl8ff0w9p8cp"
        );
        assert_eq!(info.name(), "app-ab");
    }

    #[test]
    fn renders_a_real_narinfo_byte_for_byte() {
        assert_eq!(parse(REAL).unwrap().render(), REAL);
        // Nix writes an empty reference list as "References: " (with the space).
        let ca = "StorePath: /nix/store/6ixw2a96qkk7dsv78j78kq6f8j76fgr7-hello.txt\n\
            URL: nar/1b26xkfi12a87bd8yhnq5mhf6g52d7hb0b5sh63n5bmcg7alb5nk.nar\n\
            Compression: none\n\
            FileHash: sha256:1b26xkfi12a87bd8yhnq5mhf6g52d7hb0b5sh63n5bmcg7alb5nk\n\
            FileSize: 128\n\
            NarHash: sha256:1b26xkfi12a87bd8yhnq5mhf6g52d7hb0b5sh63n5bmcg7alb5nk\n\
            NarSize: 128\n\
            References: \n\
            CA: fixed:r:sha256:1b26xkfi12a87bd8yhnq5mhf6g52d7hb0b5sh63n5bmcg7alb5nk\n";
        let info = parse(ca).unwrap();
        assert!(info.references.is_empty());
        assert_eq!(info.render(), ca);
    }

    #[test]
    fn fingerprint_matches_what_nix_signed() {
        assert_eq!(parse(REAL).unwrap().fingerprint(), REAL_FINGERPRINT);
    }

    #[test]
    fn fingerprint_normalises_every_nar_hash_encoding() {
        for hash in [HEX_HASH, SRI_HASH, B64_HASH] {
            let text = REAL.replace(
                "sha256:01772l4g95pwc0lq96idyn3q80d56wg8qs5s9dg45zc9vfgnckb4",
                hash,
            );
            let info = parse(&text).unwrap();
            assert_eq!(info.nar_hash, hash, "the field itself is kept as sent");
            assert_eq!(info.fingerprint(), REAL_FINGERPRINT, "{hash}");
        }
        // Upper-case hex is still hex.
        let upper = format!("sha256:{}", HEX_HASH[7..].to_ascii_uppercase());
        let info = parse(&REAL.replace(
            "sha256:01772l4g95pwc0lq96idyn3q80d56wg8qs5s9dg45zc9vfgnckb4",
            &upper,
        ))
        .unwrap();
        assert_eq!(info.fingerprint(), REAL_FINGERPRINT);
    }

    #[test]
    fn fingerprint_sorts_and_dedups_references_like_nix() {
        let text = REAL.replace(
            "References: l9bppir49hamiijc3hsw53yji18scbbj-lib2-ab pfwfh77pcavcf2ph6x9352sd5w707sk8-lib1-ab",
            "References: pfwfh77pcavcf2ph6x9352sd5w707sk8-lib1-ab l9bppir49hamiijc3hsw53yji18scbbj-lib2-ab pfwfh77pcavcf2ph6x9352sd5w707sk8-lib1-ab",
        );
        let info = parse(&text).unwrap();
        assert_eq!(info.references.len(), 3, "file order is kept in the field");
        assert_eq!(info.fingerprint(), REAL_FINGERPRINT);
    }

    #[test]
    fn fingerprint_without_references_ends_in_a_semicolon() {
        assert_eq!(
            parse(MINIMAL).unwrap().fingerprint(),
            "1;/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x;\
             sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;5;"
        );
    }

    #[test]
    fn tolerant_of_spacing_empty_lines_and_unknown_keys() {
        let text = "\n\nStorePath:/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x\n\
            URL:  nar/x.nar\n\
            \n\
            NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
            NarSize: 5\n\
            References:\n\
            System: x86_64-linux\n\
            Future-Field: a: b: c\n\
            Sig: a:AAAA\n\
            Sig: b:BBBB\n\
            Sig: \n\
            Deriver: unknown-deriver\n\
            Compression: \n\
            CA:";
        let info = parse(text).unwrap();
        assert_eq!(
            info.store_path,
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x"
        );
        // Only one space after the colon is a separator.
        assert_eq!(info.url, " nar/x.nar");
        assert!(info.references.is_empty());
        assert_eq!(info.sigs, ["a:AAAA", "b:BBBB"]);
        assert_eq!(info.deriver, None);
        assert_eq!(info.compression, None);
        assert_eq!(info.ca, None);
    }

    #[test]
    fn relay_form_keeps_a_well_formed_narinfo_as_sent() {
        let relayed = relay_form(REAL.as_bytes(), None);
        assert!(matches!(relayed, Cow::Borrowed(_)));
        assert_eq!(&*relayed, REAL.as_bytes());
        // Unknown fields, field order, an absent References line and
        // double spaces are the upstream's business: kept byte for byte.
        let odd = "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x\n\
            NarSize: 5\n\
            System: i686-linux\n\
            URL: nar/x.nar\n\
            PartialClosure: 1\n\
            Future:  two spaces\n\
            NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n";
        assert!(parse(odd).is_ok());
        assert!(matches!(relay_form(odd.as_bytes(), None), Cow::Borrowed(_)));
    }

    #[test]
    fn relay_form_rewrites_only_the_lines_nix_misreads() {
        // Each of these breaks Nix 2.8 when served as-is (measured): the
        // first byte after "URL:" is eaten, "References:" swallows the next
        // line, an empty line hides the line after it, and a missing final
        // newline is "corrupt".
        let sloppy = "StorePath:/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x\n\
            URL:nar/x.nar\n\
            System: x86_64-linux\n\
            References:\n\
            \n\
            Unknown:\n\
            Odd:kept\n\
            NarHash:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
            NarSize:5";
        let relayed = relay_form(sloppy.as_bytes(), None);
        assert_eq!(
            std::str::from_utf8(&relayed).unwrap(),
            "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x\n\
             URL: nar/x.nar\n\
             System: x86_64-linux\n\
             References: \n\
             Unknown: \n\
             Odd:kept\n\
             NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
             NarSize: 5\n"
        );
        assert_eq!(parse(sloppy), parse(std::str::from_utf8(&relayed).unwrap()));
        // Only the final newline missing: everything else as sent.
        let no_newline = REAL.trim_end_matches('\n');
        assert_eq!(&*relay_form(no_newline.as_bytes(), None), REAL.as_bytes());
    }

    #[test]
    fn relay_form_replaces_the_url_value_only() {
        let relayed = relay_form(
            REAL.as_bytes(),
            Some("nar/z3358nh04rrn2fw765nlbl8ff0w9p8cp.nar.xz"),
        );
        let text = std::str::from_utf8(&relayed).unwrap();
        let expected = REAL.replace(
            "URL: nar/17c7k3n58rpb2v76acz518qn3z0y23pkx9dc1plz246kgzj0jpz2.nar.xz",
            "URL: nar/z3358nh04rrn2fw765nlbl8ff0w9p8cp.nar.xz",
        );
        assert_eq!(text, expected);
        // Already that URL: nothing to copy.
        let same = relay_form(
            REAL.as_bytes(),
            Some("nar/17c7k3n58rpb2v76acz518qn3z0y23pkx9dc1plz246kgzj0jpz2.nar.xz"),
        );
        assert!(matches!(same, Cow::Borrowed(_)));
    }

    #[test]
    fn property_relay_form_parses_to_the_same_narinfo() {
        let mut seed = 0x5eed_u64;
        for _ in 0..300 {
            let text = random_info(&mut seed).render();
            // Spoil it the ways upstreams do: no spaces, blank lines, no
            // final newline.
            let sloppy = text
                .replace(": ", ":")
                .replacen('\n', "\n\n", 2)
                .trim_end()
                .to_owned();
            let Ok(info) = NarInfo::parse(sloppy.as_bytes()) else {
                continue;
            };
            let relayed = relay_form(sloppy.as_bytes(), None);
            assert_eq!(NarInfo::parse(&relayed), Ok(info));
            assert!(relayed.ends_with(b"\n"));
            assert!(!relayed.windows(2).any(|w| w == b"\n\n"));
            assert_eq!(&*relay_form(&relayed, None), &*relayed, "idempotent");
        }
    }

    #[test]
    fn render_rewrites_forms_nix_misreads() {
        // Each of these breaks Nix 2.8 when served as-is (measured): the
        // first byte after "URL:" is eaten, "References:" swallows the next
        // line, and a missing final newline is "corrupt".
        let sloppy = "StorePath:/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x\n\
            URL:nar/x.nar\n\
            References:\n\
            NarHash:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
            NarSize:5";
        let rendered = parse(sloppy).unwrap().render();
        assert_eq!(
            rendered,
            "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x\n\
             URL: nar/x.nar\n\
             NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
             NarSize: 5\n\
             References: \n"
        );
    }

    #[test]
    fn references_tolerate_extra_spaces() {
        let info = parse(&with_line(
            "References:  0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-a   1b8m03r63zqhnjf7l5wnldhh7c134ap5-b ",
        ))
        .unwrap();
        assert_eq!(
            info.references,
            [
                "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-a",
                "1b8m03r63zqhnjf7l5wnldhh7c134ap5-b"
            ]
        );
    }

    #[test]
    fn required_keys_must_be_present() {
        for (key, want) in [
            ("StorePath", "StorePath"),
            ("URL", "URL"),
            ("NarHash", "NarHash"),
            ("NarSize", "NarSize"),
        ] {
            let text: String = MINIMAL
                .lines()
                .filter(|l| !l.starts_with(key))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(parse(&text), Err(NarInfoError::Missing(want)), "{key}");
        }
        assert_eq!(parse(""), Err(NarInfoError::Missing("StorePath")));
    }

    #[test]
    fn rejects_invalid_store_paths() {
        let cases = [
            "/gnu/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5p-x",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pe-x",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr_x",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-a/b",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-a b",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-..",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-.-x",
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-\u{e9}",
            "nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x",
            "/nix/store//0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x",
            "",
        ];
        for path in cases {
            let text = replace_line("StorePath", &format!("StorePath: {path}"));
            assert!(
                matches!(
                    parse(&text),
                    Err(NarInfoError::Invalid {
                        key: "StorePath",
                        line: 1,
                        ..
                    })
                ),
                "{path:?}"
            );
        }
        let long = format!(
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-{}",
            "a".repeat(212)
        );
        assert!(parse(&replace_line("StorePath", &format!("StorePath: {long}"))).is_err());
        let ok = format!(
            "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-{}",
            "a".repeat(211)
        );
        assert!(parse(&replace_line("StorePath", &format!("StorePath: {ok}"))).is_ok());
        let odd = "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-.a+b-c_d?e=F.9";
        assert!(parse(&replace_line("StorePath", &format!("StorePath: {odd}"))).is_ok());
    }

    #[test]
    fn rejects_bad_references_and_derivers() {
        for line in [
            "References: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-a",
            "References: 0mdqa9w1p6cmli6976v4wi0sw9r4p5pr",
            "References: 0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-a\tb",
            "Deriver: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-a.drv",
            "Deriver: nonsense",
        ] {
            assert!(
                matches!(
                    parse(&with_line(line)),
                    Err(NarInfoError::Invalid { line: 5, .. })
                ),
                "{line}"
            );
        }
    }

    #[test]
    fn sizes_must_be_plain_u64() {
        let max = format!("NarSize: {}", u64::MAX);
        assert_eq!(
            parse(&replace_line("NarSize", &max)).unwrap().nar_size,
            u64::MAX
        );
        for bad in [
            "18446744073709551616",
            "-1",
            "+5",
            " 5",
            "5 ",
            "0x10",
            "",
            "0",
        ] {
            let text = replace_line("NarSize", &format!("NarSize: {bad}"));
            assert!(
                matches!(
                    parse(&text),
                    Err(NarInfoError::Invalid { key: "NarSize", .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(parse(&with_line("FileSize: 0")).unwrap().file_size, Some(0));
        assert!(matches!(
            parse(&with_line("FileSize: 99999999999999999999")),
            Err(NarInfoError::Invalid {
                key: "FileSize",
                ..
            })
        ));
    }

    #[test]
    fn rejects_bad_nar_hashes() {
        for bad in [
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7",
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7e",
            "sha256:zmdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "sha257:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "sha256-ZE1mn9uJ/UJeS7pojB43pQGEh/UtmoQpYPyW9AgV5w==",
            "sha256:644d669fdb89fd425e4bba688c1e37a5018487f52d9a842960fc96f40815e70g",
            "",
        ] {
            let text = replace_line("NarHash", &format!("NarHash: {bad}"));
            assert!(
                matches!(
                    parse(&text),
                    Err(NarInfoError::Invalid { key: "NarHash", .. })
                ),
                "{bad:?}"
            );
        }
        for good in [
            "sha512:2gs8k559z4rlahfx0y688s49m2vvszylcikrfinm30ly9rak69236nkam5ydvly1ai7xac99vxfc4ii84hawjbk876blyk1jfhkbbyx",
            "sha1:kpcd173cq987hw957sx6m0868wv3x6d9",
            "md5:900150983cd24fb0d6963f7d28e17f72",
        ] {
            let text = replace_line("NarHash", &format!("NarHash: {good}"));
            assert!(parse(&text).is_ok(), "{good}");
        }
    }

    #[test]
    fn rejects_duplicate_single_valued_keys() {
        for line in [
            "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x",
            "URL: nar/y.nar",
            "NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "NarSize: 5",
            "Compression: xz",
            "FileHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "FileSize: 3",
            "References: ",
            "Deriver: unknown-deriver",
            "CA: fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        ] {
            let key = line.split(':').next().unwrap();
            let text = format!("{MINIMAL}{line}\n{line}\n");
            let err = parse(&text).unwrap_err();
            assert!(
                matches!(err, NarInfoError::Duplicate { key: k, .. } if k == key),
                "{line}: {err:?}"
            );
        }
    }

    #[test]
    fn rejects_carriage_returns_anywhere() {
        assert_eq!(
            parse(&MINIMAL.replace('\n', "\r\n")),
            Err(NarInfoError::CarriageReturn)
        );
        assert_eq!(
            parse(&with_line("X-Unknown: a\rb")),
            Err(NarInfoError::CarriageReturn)
        );
        assert_eq!(
            parse(&format!("{MINIMAL}\r")),
            Err(NarInfoError::CarriageReturn)
        );
    }

    #[test]
    fn rejects_non_utf8_and_lines_without_colon() {
        let mut bytes = MINIMAL.as_bytes().to_vec();
        bytes.extend_from_slice(b"X: \xff\xfe\n");
        assert_eq!(NarInfo::parse(&bytes), Err(NarInfoError::NotUtf8));
        assert_eq!(
            parse(&with_line("garbage")),
            Err(NarInfoError::MalformedLine(5))
        );
    }

    #[test]
    fn size_limit_is_4_mib() {
        assert_eq!(MAX_NARINFO_SIZE, 4 << 20);
        let pad = |total: usize| {
            let filler = total - MINIMAL.len() - "X: \n".len();
            format!("{MINIMAL}X: {}\n", "a".repeat(filler))
        };
        let at_limit = pad(MAX_NARINFO_SIZE);
        assert_eq!(at_limit.len(), MAX_NARINFO_SIZE);
        assert!(parse(&at_limit).is_ok());
        let over = pad(MAX_NARINFO_SIZE + 1);
        assert_eq!(
            parse(&over),
            Err(NarInfoError::TooLarge(MAX_NARINFO_SIZE + 1))
        );
    }

    #[test]
    fn error_messages_name_the_problem() {
        let err = parse(&replace_line("NarSize", "NarSize: 99999999999999999999")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "narinfo line 4: invalid NarSize: not a number in u64 range"
        );
        assert_eq!(
            NarInfoError::Missing("URL").to_string(),
            "narinfo has no URL"
        );
    }

    /// Deterministic generator for the property tests (splitmix64).
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn random_basename(seed: &mut u64) -> String {
        let bytes: Vec<u8> = (0..20).map(|_| next(seed) as u8).collect();
        let names = ["a", "hello-2.12", "x.drv", "lib+c_d?e=f", "glibc-2.40-66"];
        let name = names[(next(seed) % names.len() as u64) as usize];
        format!("{}-{name}", base32::encode(&bytes))
    }

    fn random_opt(seed: &mut u64, value: &str) -> Option<String> {
        (next(seed) % 2 == 0).then(|| value.to_owned())
    }

    fn random_info(seed: &mut u64) -> NarInfo {
        let digest: Vec<u8> = (0..32).map(|_| next(seed) as u8).collect();
        let n_refs = (next(seed) % 5) as usize;
        let n_sigs = (next(seed) % 4) as usize;
        NarInfo {
            store_path: format!("{STORE_DIR}/{}", random_basename(seed)),
            url: format!("nar/{}.nar?x={}", base32::encode(&digest), next(seed)),
            compression: random_opt(seed, "zstd"),
            file_hash: random_opt(seed, &format!("sha256:{}", base32::encode(&digest))),
            file_size: (next(seed) % 2 == 0).then(|| next(seed)),
            nar_hash: format!("sha256:{}", base32::encode(&digest)),
            nar_size: next(seed).max(1),
            references: (0..n_refs).map(|_| random_basename(seed)).collect(),
            deriver: (next(seed) % 2 == 0).then(|| random_basename(seed)),
            sigs: (0..n_sigs)
                .map(|i| format!("k{i}:{}", next(seed)))
                .collect(),
            ca: random_opt(seed, "fixed:r:sha256:abc"),
        }
    }

    #[test]
    fn property_render_then_parse_is_identity() {
        let mut seed = 42;
        for _ in 0..500 {
            let info = random_info(&mut seed);
            let text = info.render();
            assert!(!text.contains('\r'));
            assert_eq!(parse(&text).as_ref(), Ok(&info), "{text}");
        }
    }

    #[test]
    fn property_mangled_input_never_panics() {
        // Truncations, byte flips and line swaps of valid narinfos either
        // parse to something that renders and re-parses, or fail cleanly.
        let mut seed = 9;
        for round in 0..3000 {
            let mut bytes = random_info(&mut seed).render().into_bytes();
            match round % 3 {
                0 => bytes.truncate((next(&mut seed) as usize) % (bytes.len() + 1)),
                1 => {
                    let i = (next(&mut seed) as usize) % bytes.len();
                    bytes[i] = next(&mut seed) as u8;
                }
                _ => {
                    let i = (next(&mut seed) as usize) % bytes.len();
                    bytes.insert(i, b"\n: -/\r"[(next(&mut seed) % 6) as usize]);
                }
            }
            if let Ok(info) = NarInfo::parse(&bytes) {
                let _ = info.store_hash();
                let _ = info.fingerprint();
                assert_eq!(NarInfo::parse(info.render().as_bytes()), Ok(info));
            }
        }
    }
}
