//! Which spelling wins where two settings name the same thing: ncro 2.2's
//! key and today's ncro's, a per-upstream key and a global one, the file
//! and an `NCRO_*` variable, the config and `~/.netrc`. `check-config`
//! (and `--check`) prints each line as `note: ...` on stderr, `serve`
//! logs them at info. COLD: runs once at load.
//!
//! Every rule is one function in [`RULES`]; a rule sees the config as the
//! file wrote it (before `NCRO_*` overrides), the environment and the
//! netrc file, and returns one line per case it finds. To report a new
//! pair of spellings, add a function and list it there.

use super::env::EnvLookup;
use super::netrc::{self, Netrc};
use super::raw::RawConfig;

/// What a rule may look at.
pub struct Inputs<'a> {
    /// The config as written in the file (or the embedded default),
    /// before environment overrides.
    pub file: &'a RawConfig,
    pub env: &'a dyn EnvLookup,
    pub netrc: Option<&'a Netrc>,
}

type Rule = fn(&Inputs<'_>) -> Vec<String>;

/// Every rule, in the order their lines are printed.
const RULES: &[Rule] = &[
    public_key_and_public_keys,
    env_overrides,
    idle_and_read_timeout,
    nar_timeout_and_idle,
    narinfo_timeout_and_race_deadline,
    strict_policy_and_hedge_after,
    username_and_netrc,
];

/// One line per place where two spellings meet, saying which one is used.
pub fn report(inputs: &Inputs<'_>) -> Vec<String> {
    RULES.iter().flat_map(|rule| rule(inputs)).collect()
}

/// ncro 2.2 had one `public_key`; today's ncro added `public_keys`.
fn public_key_and_public_keys(i: &Inputs<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for (n, u) in i.file.upstreams.iter().flatten().enumerate() {
        if u.public_key.is_empty() || u.public_keys.is_empty() {
            continue;
        }
        let mut keys: Vec<&str> = std::iter::once(u.public_key.as_str())
            .chain(u.public_keys.iter().map(String::as_str))
            .filter(|k| !k.is_empty())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        out.push(format!(
            "upstream[{n}]: public_key and public_keys are merged ({} distinct keys); a narinfo is accepted when any of them verifies it",
            keys.len()
        ));
    }
    out
}

/// `NCRO_LISTEN`, `NCRO_DB_PATH`, `NCRO_LOG_LEVEL` over the file's keys.
fn env_overrides(i: &Inputs<'_>) -> Vec<String> {
    let f = i.file;
    let pairs: [(&str, &str, Option<&str>); 3] = [
        (
            "NCRO_LISTEN",
            "server.listen",
            Some(f.server.listen.as_str()),
        ),
        ("NCRO_DB_PATH", "cache.db_path", f.cache.db_path.as_deref()),
        (
            "NCRO_LOG_LEVEL",
            "logging.level",
            Some(f.logging.level.as_str()),
        ),
    ];
    let mut out = Vec::new();
    for (var, key, file_value) in pairs {
        let Some(v) = i.env.get(var).filter(|v| !v.is_empty()) else {
            continue;
        };
        match file_value {
            Some(fv) if fv != v => out.push(format!(
                "{var}={v:?} wins over {key} = {fv:?} from the config"
            )),
            _ => {}
        }
    }
    out
}

/// Today's ncro uses `server.read_timeout` as the idle timeout of NAR
/// streams; ncro has `timeouts.idle` for that, defaulting to it.
fn idle_and_read_timeout(i: &Inputs<'_>) -> Vec<String> {
    let f = i.file;
    match f.timeouts.idle {
        Some(idle) if idle != f.server.read_timeout => vec![format!(
            "timeouts.idle = {idle:?} is the idle limit of relayed bodies (upstream reads, client writes); server.read_timeout = {:?} applies to client request heads and keep-alive only",
            f.server.read_timeout
        )],
        _ => Vec::new(),
    }
}

/// Today's ncro's per-upstream `nar_timeout` over ncro's global
/// `timeouts.idle` (itself defaulting to `server.read_timeout`).
fn nar_timeout_and_idle(i: &Inputs<'_>) -> Vec<String> {
    let f = i.file;
    let global = f.timeouts.idle.map_or_else(
        || format!("server.read_timeout = {:?}", f.server.read_timeout),
        |d| format!("timeouts.idle = {d:?}"),
    );
    let mut out = Vec::new();
    for (n, u) in f.upstreams.iter().flatten().enumerate() {
        if let Some(t) = u.nar_timeout {
            out.push(format!(
                "upstream[{n}]: nar_timeout = {t:?} is the idle limit of this upstream's NAR streams; {global} applies to the other upstreams and to client writes"
            ));
        }
    }
    out
}

/// A per-upstream `narinfo_timeout` bounds one request; the tier's
/// `timeouts.race_deadline` still bounds the race.
fn narinfo_timeout_and_race_deadline(i: &Inputs<'_>) -> Vec<String> {
    let f = i.file;
    let deadline = f.timeouts.race_deadline;
    let mut out = Vec::new();
    for (n, u) in f.upstreams.iter().flatten().enumerate() {
        match u.narinfo_timeout {
            Some(t) if t.0 > deadline.0 => out.push(format!(
                "upstream[{n}]: narinfo_timeout = {t:?} is longer than timeouts.race_deadline = {deadline:?}; the race deadline wins"
            )),
            _ => {}
        }
    }
    out
}

/// `cache.resolution_policy = "strict"` turns off `health.hedge_after`'s
/// early start of the next tier.
fn strict_policy_and_hedge_after(i: &Inputs<'_>) -> Vec<String> {
    let f = i.file;
    if f.cache.resolution_policy == super::raw::narinfo::ResolutionPolicy::Strict {
        vec![format!(
            "cache.resolution_policy = \"strict\": a lower tier is asked only after the tier above answered; health.hedge_after = {:?} is not used",
            f.health.hedge_after
        )]
    } else {
        Vec::new()
    }
}

/// A configured `username` wins over a netrc entry for the same host.
fn username_and_netrc(i: &Inputs<'_>) -> Vec<String> {
    let Some(n) = i.netrc else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, u) in i.file.upstreams.iter().flatten().enumerate() {
        let Some(host) = netrc::http_host(u.url.trim()) else {
            continue;
        };
        if u.username.is_empty() || n.lookup(host).is_none() {
            continue;
        }
        out.push(format!(
            "upstream[{k}]: username is set, so the {} entry for {host} is not used",
            n.path.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env::MapEnv;

    fn raw(text: &str) -> RawConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn names_each_case_and_nothing_else() {
        let file = raw(r#"
[server]
listen = ":9000"
read_timeout = "30s"
[timeouts]
idle = "2m"
[[upstreams]]
url = "https://a.example"
public_key = "k1:AAAA"
public_keys = ["k2:BBBB", "k1:AAAA"]
username = "me"
[[upstreams]]
url = "https://b.example"
public_keys = ["k3:CCCC"]
"#);
        let env = MapEnv::new(&[("NCRO_LISTEN", "127.0.0.1:1"), ("NCRO_LOG_LEVEL", "")]);
        let n = Netrc {
            path: "/n".into(),
            entries: netrc::parse("machine a.example login x\nmachine b.example login y\n"),
        };
        let lines = report(&Inputs {
            file: &file,
            env: &env,
            netrc: Some(&n),
        });
        assert_eq!(
            lines,
            vec![
                "upstream[0]: public_key and public_keys are merged (2 distinct keys); a narinfo is accepted when any of them verifies it".to_owned(),
                "NCRO_LISTEN=\"127.0.0.1:1\" wins over server.listen = \":9000\" from the config".to_owned(),
                "timeouts.idle = 2m is the idle limit of relayed bodies (upstream reads, client writes); server.read_timeout = 30s applies to client request heads and keep-alive only".to_owned(),
                "upstream[0]: username is set, so the /n entry for a.example is not used".to_owned(),
            ]
        );
        // The defaults alone report nothing.
        let quiet = report(&Inputs {
            file: &RawConfig::default(),
            env: &MapEnv::new(&[]),
            netrc: None,
        });
        assert!(quiet.is_empty(), "{quiet:?}");
    }

    #[test]
    fn per_upstream_timeouts_and_the_strict_policy_are_named() {
        let file = raw(r#"
[timeouts]
race_deadline = "5s"
[cache]
resolution_policy = "strict"
[[upstreams]]
url = "https://a.example"
nar_timeout = "90s"
narinfo_timeout = "10s"
[[upstreams]]
url = "https://b.example"
narinfo_timeout = "1s"
"#);
        let lines = report(&Inputs {
            file: &file,
            env: &MapEnv::new(&[]),
            netrc: None,
        });
        assert_eq!(
            lines,
            vec![
                "upstream[0]: nar_timeout = 1m 30s is the idle limit of this upstream's NAR streams; server.read_timeout = 30s applies to the other upstreams and to client writes".to_owned(),
                "upstream[0]: narinfo_timeout = 10s is longer than timeouts.race_deadline = 5s; the race deadline wins".to_owned(),
                "cache.resolution_policy = \"strict\": a lower tier is asked only after the tier above answered; health.hedge_after = 2s is not used".to_owned(),
            ]
        );
    }
}
