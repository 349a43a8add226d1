//! Per-upstream allow/deny filters, applied to a narinfo after it has been
//! fetched (the request only names a hash, so there is nothing to filter
//! on before).
//!
//! Decision: any matching `deny` rejects, whatever the rule order; if any
//! `allow` rule exists, at least one must match; with no rules everything
//! passes.

pub use crate::config::filter::{FilterAction, FilterField, FilterRule};
use crate::proto::narinfo::NarInfo;

/// True if `text` matches `pattern`, where `*` matches any (possibly
/// empty) run of characters and every other character matches itself.
///
/// Runs in O(|pattern| + |text|): the part before the first `*` must be a
/// prefix and the part after the last `*` a suffix of what remains (this
/// anchoring is what ncro 2.2 got wrong for `*-source` on
/// `x-source-source`); the literals in between are then found leftmost
/// first, which is always safe because a later `*` can absorb any text
/// skipped. `str::find` is linear (two-way search), so no input can make
/// this quadratic.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let (middle, tail) = rest.rsplit_once('*').unwrap_or(("", rest));
    let Some(text) = text.strip_prefix(head) else {
        return false;
    };
    // Stripping the suffix from what the prefix left keeps head and tail
    // from overlapping (`a*a` must not match `a`).
    let Some(mut text) = text.strip_suffix(tail) else {
        return false;
    };
    for literal in middle.split('*').filter(|l| !l.is_empty()) {
        match text.find(literal) {
            Some(at) => text = &text[at + literal.len()..],
            None => return false,
        }
    }
    true
}

/// Whether `info` passes `rules` (see the module docs for the decision).
pub fn allows(rules: &[FilterRule], info: &NarInfo) -> bool {
    let mut has_allow = false;
    let mut allowed = false;
    for rule in rules {
        match rule.action {
            FilterAction::Deny if rule_matches(rule, info) => return false,
            FilterAction::Deny => {}
            FilterAction::Allow => {
                has_allow = true;
                allowed = allowed || rule_matches(rule, info);
            }
        }
    }
    !has_allow || allowed
}

fn rule_matches(rule: &FilterRule, info: &NarInfo) -> bool {
    let pattern = rule.pattern.as_str();
    match rule.field {
        FilterField::Name => wildcard_match(pattern, info.name()),
        FilterField::StorePath => wildcard_match(pattern, &info.store_path),
        FilterField::Reference => info.references.iter().any(|r| wildcard_match(pattern, r)),
        FilterField::Deriver => info
            .deriver
            .as_deref()
            .is_some_and(|d| wildcard_match(pattern, d)),
    }
}

/// Rejects rules that are certainly mistakes: an empty pattern, or one
/// with a character that never occurs in the field it is matched against
/// (such a rule could never match, so a `deny` would silently do nothing).
pub fn validate(rules: &[FilterRule]) -> Result<(), String> {
    for rule in rules {
        if rule.pattern.is_empty() {
            return Err("pattern is empty".to_owned());
        }
        let slash_ok = rule.field == FilterField::StorePath;
        let possible =
            |c: char| c.is_ascii_alphanumeric() || "+-._?=*".contains(c) || (slash_ok && c == '/');
        if let Some(c) = rule.pattern.chars().find(|&c| !possible(c)) {
            return Err(format!(
                "pattern {:?} contains {c:?}, which never occurs in a {}",
                rule.pattern,
                field_noun(rule.field)
            ));
        }
    }
    Ok(())
}

fn field_noun(field: FilterField) -> &'static str {
    match field {
        FilterField::Name => "store path name",
        FilterField::StorePath => "store path",
        FilterField::Reference => "reference basename",
        FilterField::Deriver => "deriver basename",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn info(refs: &str, deriver: Option<&str>) -> NarInfo {
        let mut text = String::from(
            "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-python3.12-requests-2.32\n\
             URL: nar/x.nar\n\
             NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
             NarSize: 5\n",
        );
        text.push_str(&format!("References: {refs}\n"));
        if let Some(d) = deriver {
            text.push_str(&format!("Deriver: {d}\n"));
        }
        NarInfo::parse(text.as_bytes()).unwrap()
    }

    fn sample() -> NarInfo {
        info(
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5-glibc-2.40 kpcd173cq987hw957sx6m0868wv3x6d9-openssl-3.0",
            Some("3jgzhjhz9zjvbb0kyj7jc500chzzzzzz-python3.12-requests-2.32.drv"),
        )
    }

    fn rule(action: FilterAction, field: FilterField, pattern: &str) -> FilterRule {
        FilterRule {
            action,
            field,
            pattern: pattern.to_owned(),
        }
    }

    fn allow(field: FilterField, pattern: &str) -> FilterRule {
        rule(FilterAction::Allow, field, pattern)
    }

    fn deny(field: FilterField, pattern: &str) -> FilterRule {
        rule(FilterAction::Deny, field, pattern)
    }

    use FilterField::{Deriver, Name, Reference, StorePath};

    #[derive(Deserialize, Debug)]
    struct Wrapper {
        filter: Vec<FilterRule>,
    }

    fn from_toml(s: &str) -> Result<Vec<FilterRule>, String> {
        toml::from_str::<Wrapper>(s)
            .map(|w| w.filter)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn deserialises_with_defaults_and_exact_names() {
        let rules = from_toml(
            r#"
            [[filter]]
            pattern = "python3*"
            [[filter]]
            action = "deny"
            field = "store_path"
            pattern = "/nix/store/*-source"
            [[filter]]
            action = "allow"
            field = "reference"
            pattern = "*-glibc-*"
            [[filter]]
            field = "deriver"
            pattern = "*.drv"
            [[filter]]
            field = "name"
            pattern = "*"
            "#,
        )
        .unwrap();
        assert_eq!(
            rules,
            [
                allow(Name, "python3*"),
                deny(StorePath, "/nix/store/*-source"),
                allow(Reference, "*-glibc-*"),
                allow(Deriver, "*.drv"),
                allow(Name, "*"),
            ]
        );
    }

    #[test]
    fn deserialisation_rejects_unknown_names_and_fields() {
        for bad in [
            r#"[[filter]]
               pattern = "x"
               actoin = "deny""#,
            r#"[[filter]]
               action = "block"
               pattern = "x""#,
            r#"[[filter]]
               field = "storePath"
               pattern = "x""#,
            r#"[[filter]]
               action = "Deny"
               pattern = "x""#,
            r#"[[filter]]
               action = "deny""#,
        ] {
            assert!(from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcard_basics() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("", ""));
        assert!(!wildcard_match("", "a"));
        assert!(wildcard_match("hello", "hello"));
        assert!(!wildcard_match("hello", "hello2"));
        assert!(!wildcard_match("Hello", "hello"), "case-sensitive");
        assert!(wildcard_match("python3*", "python3.12-requests"));
        assert!(wildcard_match("*requests*", "python3.12-requests-2.32"));
        assert!(wildcard_match("a*b*c", "abc"));
        assert!(wildcard_match("a*b*c", "aXbYbZc"));
        assert!(!wildcard_match("a*b*c", "acb"));
        assert!(wildcard_match("**", ""));
        assert!(wildcard_match("a**b", "ab"));
        assert!(wildcard_match("?", "?"), "only * is special");
        assert!(!wildcard_match("?", "a"));
    }

    #[test]
    fn wildcard_anchors_repeated_literals() {
        // Regression: ncro 2.2 failed these because it matched the last
        // literal at its first occurrence instead of at the end.
        assert!(wildcard_match("*-source", "x-source-source"));
        assert!(wildcard_match("*ab", "abab"));
        assert!(wildcard_match("*aa", "aaa"));
        assert!(wildcard_match("a*b*ab", "abab"));
        assert!(!wildcard_match("a*a", "a"));
        assert!(!wildcard_match("ab*ba", "aba"));
        assert!(wildcard_match("ab*ba", "abba"));
    }

    #[test]
    fn wildcard_handles_multibyte_text() {
        assert!(wildcard_match("*é", "café"));
        assert!(wildcard_match("c*é*", "caféé"));
        assert!(!wildcard_match("*é", "cafe"));
    }

    /// The obviously-correct exponential matcher the fast one is checked against.
    fn naive(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| naive(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && naive(rest, &t[1..]),
        }
    }

    /// Every string of length 0..=max_len over `alphabet`.
    fn all_strings(alphabet: &[u8], max_len: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut layer = vec![String::new()];
        for _ in 0..max_len {
            layer = layer
                .iter()
                .flat_map(|s| alphabet.iter().map(move |&c| format!("{s}{}", c as char)))
                .collect();
            out.extend(layer.iter().cloned());
        }
        out
    }

    #[test]
    fn property_agrees_with_naive_matcher_exhaustively() {
        let patterns = all_strings(b"ab*", 5);
        let texts = all_strings(b"ab", 6);
        let mut matched = 0;
        for p in &patterns {
            for t in &texts {
                let want = naive(p.as_bytes(), t.as_bytes());
                assert_eq!(wildcard_match(p, t), want, "pattern {p:?} text {t:?}");
                matched += usize::from(want);
            }
        }
        // Both outcomes occur plenty, so the comparison is not vacuous.
        assert!(matched > 5_000 && matched < patterns.len() * texts.len() - 5_000);
    }

    /// Deterministic generator (splitmix64).
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn random_string(seed: &mut u64, alphabet: &[u8], max_len: u64) -> String {
        let len = next(seed) % (max_len + 1);
        (0..len)
            .map(|_| alphabet[(next(seed) % alphabet.len() as u64) as usize] as char)
            .collect()
    }

    #[test]
    fn property_agrees_with_naive_matcher_on_longer_random_strings() {
        let mut seed = 3;
        for _ in 0..20_000 {
            let p = random_string(&mut seed, b"ab-*", 10);
            let t = random_string(&mut seed, b"ab-", 16);
            assert_eq!(
                wildcard_match(&p, &t),
                naive(p.as_bytes(), t.as_bytes()),
                "pattern {p:?} text {t:?}"
            );
        }
    }

    #[test]
    fn no_rules_allow_everything() {
        assert!(allows(&[], &sample()));
    }

    #[test]
    fn name_is_what_follows_the_first_dash() {
        assert!(allows(
            &[allow(Name, "python3.12-requests-2.32")],
            &sample()
        ));
        assert!(allows(&[allow(Name, "python3*")], &sample()));
        assert!(!allows(&[allow(Name, "requests*")], &sample()));
        assert!(!allows(
            &[allow(Name, "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr*")],
            &sample()
        ));
    }

    #[test]
    fn store_path_is_the_full_path() {
        let full = "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-python3.12-requests-2.32";
        assert!(allows(&[allow(StorePath, full)], &sample()));
        assert!(allows(
            &[allow(StorePath, "/nix/store/0mdqa9w1*")],
            &sample()
        ));
        assert!(!allows(&[allow(StorePath, "python3*")], &sample()));
    }

    #[test]
    fn reference_matches_any_entry() {
        assert!(allows(&[allow(Reference, "*-openssl-*")], &sample()));
        assert!(!allows(&[deny(Reference, "*-glibc-2.40")], &sample()));
        assert!(allows(&[deny(Reference, "*-musl-*")], &sample()));
        let no_refs = info("", None);
        assert!(!allows(&[allow(Reference, "*")], &no_refs));
        assert!(allows(&[deny(Reference, "*")], &no_refs));
    }

    #[test]
    fn missing_deriver_never_matches() {
        assert!(allows(&[allow(Deriver, "*.drv")], &sample()));
        let no_deriver = info("", None);
        assert!(!allows(&[allow(Deriver, "*")], &no_deriver));
        assert!(allows(&[deny(Deriver, "*")], &no_deriver));
        let unknown = info("", Some("unknown-deriver"));
        assert!(!allows(&[allow(Deriver, "*")], &unknown));
    }

    #[test]
    fn any_matching_deny_wins_regardless_of_order() {
        let a = allow(Name, "python3*");
        let d = deny(Reference, "*-openssl-*");
        assert!(!allows(&[a.clone(), d.clone()], &sample()));
        assert!(!allows(&[d, a], &sample()));
    }

    #[test]
    fn with_allow_rules_one_must_match() {
        let rules = [allow(Name, "nodejs*"), allow(Name, "rust*")];
        assert!(!allows(&rules, &sample()));
        let rules = [allow(Name, "nodejs*"), allow(Name, "python*")];
        assert!(allows(&rules, &sample()));
        // Deny rules alone: everything not denied passes.
        assert!(allows(&[deny(Name, "nodejs*")], &sample()));
    }

    #[test]
    fn validate_catches_mistakes() {
        assert_eq!(
            validate(&[allow(Name, "")]),
            Err("pattern is empty".to_owned())
        );
        assert_eq!(
            validate(&[deny(Name, "python 3")]),
            Err(
                "pattern \"python 3\" contains ' ', which never occurs in a store path name"
                    .to_owned()
            )
        );
        assert!(validate(&[deny(Reference, "/nix/store/*")]).is_err());
        assert!(validate(&[deny(Deriver, "*é")]).is_err());
        assert_eq!(
            validate(&[
                allow(Name, "*"),
                deny(StorePath, "/nix/store/*-source"),
                allow(Reference, "*-glibc-*"),
                deny(Deriver, "*.drv"),
                allow(Name, "a+b_c?d=e.f-*"),
            ]),
            Ok(())
        );
    }
}
