//! `~/.netrc` (or `$NETRC`) credentials for HTTP(S) upstreams, as today's
//! ncro reads them: once at load; a missing or unreadable file is ignored;
//! an upstream (or any upstream-like section, through [`basic_auth`]) uses
//! it only when its `username` is empty, and never for `s3://`. The entry
//! is the first `machine` whose name is the URL's host (no port), else
//! `default`; an entry with an empty login is ignored. COLD: read once at
//! start, never on a worker.
//!
//! The parser is small and lenient (no crate): tokens are separated by
//! whitespace; `machine NAME`, `default`, `login`, `password`, `account`
//! and `macdef NAME` (whose body runs to the next empty line) are
//! understood; a token may be double-quoted with backslash escapes; `#`
//! starts a comment at the start of a token. Anything else is skipped.

use std::path::{Path, PathBuf};

use super::env::EnvLookup;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// `None` for the `default` entry.
    pub machine: Option<String>,
    pub login: String,
    pub password: String,
    pub account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Netrc {
    /// Where it was read from, for messages.
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

/// `$NETRC` when non-empty, else `$HOME/.netrc`; `None` when neither names
/// a file.
pub fn location(env: &dyn EnvLookup) -> Option<PathBuf> {
    let non_empty = |k: &str| env.get(k).filter(|v| !v.is_empty());
    non_empty("NETRC")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|h| Path::new(&h).join(".netrc")))
}

/// Reads the netrc file once; a missing, unreadable or non-UTF-8 file
/// gives `None` (ignored, as in today's ncro).
pub fn load(env: &dyn EnvLookup) -> Option<Netrc> {
    let path = location(env)?;
    let text = std::fs::read_to_string(&path).ok()?;
    Some(Netrc {
        entries: parse(&text),
        path,
    })
}

/// Splits a netrc file into tokens.
struct Lexer<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn next_token(&mut self) -> Option<String> {
        loop {
            let rest = &self.s[self.pos..];
            let trimmed = rest.trim_start();
            self.pos += rest.len() - trimmed.len();
            if trimmed.is_empty() {
                return None;
            }
            if trimmed.starts_with('#') {
                let line_end = trimmed.find('\n').map_or(trimmed.len(), |i| i + 1);
                self.pos += line_end;
                continue;
            }
            if let Some(quoted) = trimmed.strip_prefix('"') {
                let mut out = String::new();
                let mut chars = quoted.char_indices();
                let mut used = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '"' => {
                            used = i + 1;
                            break;
                        }
                        '\\' => {
                            if let Some((_, e)) = chars.next() {
                                out.push(match e {
                                    'n' => '\n',
                                    't' => '\t',
                                    'r' => '\r',
                                    other => other,
                                });
                            }
                        }
                        c => out.push(c),
                    }
                }
                self.pos += 1 + used;
                return Some(out);
            }
            let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
            self.pos += end;
            return Some(trimmed[..end].to_owned());
        }
    }

    /// Skips a `macdef` body: everything up to and including the next
    /// empty line (or the end).
    fn skip_macro_body(&mut self) {
        let rest = &self.s[self.pos..];
        // The rest of the `macdef NAME` line belongs to the definition.
        let Some(nl) = rest.find('\n') else {
            self.pos = self.s.len();
            return;
        };
        let body = &rest[nl + 1..];
        let mut consumed = nl + 1;
        for line in body.split_inclusive('\n') {
            consumed += line.len();
            if line.trim_end_matches(['\n', '\r']).is_empty() {
                break;
            }
        }
        self.pos += consumed;
    }
}

/// Every entry with its fields, in file order.
pub fn parse(text: &str) -> Vec<Entry> {
    let mut lex = Lexer { s: text, pos: 0 };
    let mut entries: Vec<Entry> = Vec::new();
    let mut current: Option<Entry> = None;
    while let Some(tok) = lex.next_token() {
        match tok.as_str() {
            "machine" => {
                entries.extend(current.take());
                current = Some(Entry {
                    machine: Some(lex.next_token().unwrap_or_default()),
                    ..Entry::default()
                });
            }
            "default" => {
                entries.extend(current.take());
                current = Some(Entry::default());
            }
            "login" | "password" | "account" => {
                let value = lex.next_token().unwrap_or_default();
                if let Some(e) = current.as_mut() {
                    match tok.as_str() {
                        "login" => e.login = value,
                        "password" => e.password = value,
                        _ => e.account = value,
                    }
                }
            }
            "macdef" => {
                let _name = lex.next_token();
                lex.skip_macro_body();
            }
            _ => {}
        }
    }
    entries.extend(current);
    entries
}

impl Netrc {
    /// The entry for `host`: the first `machine` with that name (case
    /// insensitive; an IPv6 address with or without brackets) and a login,
    /// else the first `default` with a login.
    pub fn lookup(&self, host: &str) -> Option<&Entry> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let named = |m: &str| {
            let m = m.trim_start_matches('[').trim_end_matches(']');
            m.eq_ignore_ascii_case(bare)
        };
        let usable = |e: &&Entry| !e.login.is_empty();
        self.entries
            .iter()
            .filter(usable)
            .find(|e| e.machine.as_deref().is_some_and(named))
            .or_else(|| {
                self.entries
                    .iter()
                    .filter(usable)
                    .find(|e| e.machine.is_none())
            })
    }
}

/// The host of an `http://` or `https://` URL, without port or brackets'
/// contents changed (`[::1]` stays bracketed); `None` for other schemes.
pub fn http_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.starts_with('[') {
        return authority.find(']').map(|i| &authority[..=i]);
    }
    Some(authority.rsplit_once(':').map_or(authority, |(h, _)| h))
}

/// Basic auth for one upstream-like section (`what` names it in
/// messages, e.g. `upstream[0]`): the configured `username`/`password`
/// when the username is set; else, for an HTTP(S) URL, the netrc entry
/// for its host (an empty netrc password means none). A configured
/// password without a username is replaced by the netrc entry, with a
/// warning pushed to `warnings`; without an entry it is returned as is
/// (the caller decides whether that is an error).
pub fn basic_auth(
    netrc: Option<&Netrc>,
    what: &str,
    url: &str,
    username: &str,
    password: Option<String>,
    warnings: &mut Vec<String>,
) -> (Option<String>, Option<String>) {
    if !username.is_empty() {
        return (Some(username.to_owned()), password);
    }
    let entry = netrc
        .zip(http_host(url))
        .and_then(|(n, h)| Some((n, n.lookup(h)?)));
    let Some((netrc, entry)) = entry else {
        return (None, password);
    };
    if password.is_some() {
        warnings.push(format!(
            "{what}: password is set without username; the login and password of {} ({}) are used instead",
            netrc.path.display(),
            entry.machine.as_deref().map_or("default entry".to_owned(), |m| format!("machine {m}")),
        ));
    }
    let pw = Some(entry.password.clone()).filter(|p| !p.is_empty());
    (Some(entry.login.clone()), pw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env::MapEnv;

    fn netrc(text: &str) -> Netrc {
        Netrc {
            path: "/t/netrc".into(),
            entries: parse(text),
        }
    }

    #[test]
    fn parses_machines_default_macdef_comments_and_quotes() {
        let n = netrc(
            "# a comment line\nmachine cache.example login alice password s3cret account acc\n\
             macdef init\ncd /pub\nmachine evil login mallory\n\n\
             machine \"quoted host\" login \"b ob\" password \"p\\\"w\"\n\
             default login anon password\n",
        );
        assert_eq!(
            n.entries,
            vec![
                Entry {
                    machine: Some("cache.example".into()),
                    login: "alice".into(),
                    password: "s3cret".into(),
                    account: "acc".into(),
                },
                Entry {
                    machine: Some("quoted host".into()),
                    login: "b ob".into(),
                    password: "p\"w".into(),
                    account: String::new(),
                },
                Entry {
                    machine: None,
                    login: "anon".into(),
                    password: String::new(),
                    account: String::new(),
                },
            ],
            "the macdef body (with its fake machine line) is skipped"
        );
    }

    #[test]
    fn lookup_prefers_the_machine_then_default_and_skips_empty_logins() {
        let n = netrc(
            "machine a.example password nologin\nmachine A.example login first\n\
             machine a.example login second\ndefault login dflt password d\n",
        );
        assert_eq!(n.lookup("a.example").unwrap().login, "first");
        assert_eq!(n.lookup("other").unwrap().login, "dflt");
        let only_empty = netrc("machine a.example password x\n");
        assert_eq!(only_empty.lookup("a.example"), None);
        let v6 = netrc("machine ::1 login six\n");
        assert_eq!(v6.lookup("[::1]").unwrap().login, "six");
    }

    #[test]
    fn host_of_http_urls_only() {
        assert_eq!(http_host("https://c.example:8443/p"), Some("c.example"));
        assert_eq!(http_host("http://c.example"), Some("c.example"));
        assert_eq!(http_host("http://[::1]:80/x"), Some("[::1]"));
        assert_eq!(http_host("s3://bucket?endpoint=c.example"), None);
    }

    #[test]
    fn basic_auth_rules() {
        let n = netrc("machine c.example login nl password np\nmachine e.example login only\n");
        let mut w = Vec::new();
        // A configured username wins; netrc is not consulted.
        assert_eq!(
            basic_auth(
                Some(&n),
                "u",
                "http://c.example",
                "me",
                Some("pw".into()),
                &mut w
            ),
            (Some("me".into()), Some("pw".into()))
        );
        // Empty username: the host's entry, port ignored.
        assert_eq!(
            basic_auth(Some(&n), "u", "https://c.example:8443", "", None, &mut w),
            (Some("nl".into()), Some("np".into()))
        );
        // Empty netrc password means none.
        assert_eq!(
            basic_auth(Some(&n), "u", "http://e.example", "", None, &mut w),
            (Some("only".into()), None)
        );
        assert!(w.is_empty());
        // S3 and unmatched hosts get nothing.
        assert_eq!(
            basic_auth(Some(&n), "u", "s3://c.example", "", None, &mut w),
            (None, None)
        );
        assert_eq!(
            basic_auth(
                Some(&n),
                "u",
                "http://x.example",
                "",
                Some("p".into()),
                &mut w
            ),
            (None, Some("p".into()))
        );
        assert!(w.is_empty());
        // A password without username is overridden, with a warning.
        assert_eq!(
            basic_auth(
                Some(&n),
                "upstream[3]",
                "http://c.example",
                "",
                Some("p".into()),
                &mut w
            ),
            (Some("nl".into()), Some("np".into()))
        );
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("upstream[3]: password is set without username"),
            "{w:?}"
        );
        assert!(w[0].contains("/t/netrc (machine c.example)"), "{w:?}");
    }

    #[test]
    fn location_and_missing_file() {
        let env = MapEnv::new(&[("NETRC", "/x/n"), ("HOME", "/home/u")]);
        assert_eq!(location(&env), Some(PathBuf::from("/x/n")));
        let env = MapEnv::new(&[("NETRC", ""), ("HOME", "/home/u")]);
        assert_eq!(location(&env), Some(PathBuf::from("/home/u/.netrc")));
        assert_eq!(location(&MapEnv::new(&[])), None);
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none");
        let env = MapEnv::new(&[("NETRC", missing.to_str().unwrap())]);
        assert_eq!(load(&env), None);
        let file = dir.path().join("netrc");
        std::fs::write(&file, "default login x\n").unwrap();
        let env = MapEnv::new(&[("NETRC", file.to_str().unwrap())]);
        assert_eq!(load(&env).unwrap().entries.len(), 1);
    }
}
