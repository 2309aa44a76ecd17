//! Keeps secrets of database URLs (`postgres://user:password@host/db`) out of logs and error bodies.
//!
//! [`redact_url`] masks the password of a URL, and the values of its `password`, `pass` and
//! `sslpassword` query parameters, with `***`, leaving every other byte as written. [`redact_text`] and
//! [`redact_error`] clean a message (say, a sqlx error) that may echo the URL or its password.

/// What replaces a secret.
pub const MASK: &str = "***";

/// Query parameters whose value is a secret (compared case-insensitively, after percent-decoding).
const SECRET_PARAMS: [&str; 3] = ["password", "pass", "sslpassword"];

/// `url` with its password and secret query values replaced by `***`; anything else is unchanged, as
/// are URLs without a password and `sqlite:` URLs (a path, which may hold `:` and `@`). Never panics.
pub fn redact_url(url: &str) -> String {
    let parts = Parts::of(url);
    let mut out = String::with_capacity(url.len());
    let mut at = 0;
    for range in parts.secrets() {
        out.push_str(&url[at..range.start]);
        out.push_str(MASK);
        at = range.end;
    }
    out.push_str(&url[at..]);
    out
}

/// `text` with each occurrence of the raw `url` replaced by [`redact_url`]`(url)`, and of each of its
/// secrets alone (as written and percent-decoded, the way `url::Url` shows them too) by `***`.
pub fn redact_text(text: &str, url: &str) -> String {
    let redacted = redact_url(url);
    let mut out = if url.is_empty() || redacted == url { text.to_string() } else { text.replace(url, &redacted) };
    for secret in secrets(url) {
        if out.contains(&secret) {
            out = out.replace(&secret, MASK);
        }
    }
    out
}

/// An error that may echo `url` (a sqlx error, say), as one message with the URL's secrets redacted.
pub fn redact_error(err: impl Into<anyhow::Error>, url: &str) -> anyhow::Error {
    let err: anyhow::Error = err.into();
    anyhow::anyhow!(redact_text(&format!("{err:#}"), url))
}

/// The distinct non-empty secrets of `url` in every form a message may show them, longest first (so that a
/// secret inside a longer one does not break the longer one's replacement).
fn secrets(url: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for range in Parts::of(url).secrets() {
        let raw = &url[range];
        found.push(raw.to_string());
        found.push(percent_decode(raw));
        if let Some(plus) = raw.contains('+').then(|| percent_decode(&raw.replace('+', " "))) {
            found.push(plus);
        }
    }
    if let Ok(parsed) = url::Url::parse(url) {
        if let Some(password) = parsed.password() {
            found.push(password.to_string());
        }
        for (name, value) in parsed.query_pairs() {
            if is_secret_param(&name) {
                found.push(value.into_owned());
            }
        }
    }
    found.retain(|s| !s.is_empty() && s != MASK);
    found.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    found.dedup();
    found
}

fn is_secret_param(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

/// Percent-decodes (invalid escapes kept as written; invalid UTF-8 replaced).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Byte ranges of a URL's secrets. All delimiters are ASCII, so every range lies on char boundaries.
struct Parts {
    /// The password of the userinfo, if any.
    password: Option<std::ops::Range<usize>>,
    /// Values of secret query parameters.
    query: Vec<std::ops::Range<usize>>,
}

impl Parts {
    fn of(url: &str) -> Parts {
        let mut parts = Parts { password: None, query: Vec::new() };
        let Some(sep) = url.find("://") else { return parts };
        let scheme = &url[..sep];
        let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid_scheme || scheme.eq_ignore_ascii_case("sqlite") {
            return parts;
        }
        let rest_at = sep + 3;
        let rest = &url[rest_at..];
        // The authority ends at the first '/', '?' or '#'; its userinfo at its last '@' (as `url::Url` and
        // libpq read it).
        let strict_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..strict_end];
        let strict_at = authority.rfind('@');
        let host_port = &authority[strict_at.map_or(0, |at| at + 1)..];
        // A password with an unescaped '/', '?' or '#' ends the authority early, leaving (say) `user:pa` as
        // an invalid host:port. Such a URL fails to parse anyway, but its password must not show in the
        // error: then the userinfo runs to the last '@' of the URL.
        let userinfo_end = match rest[strict_end..].rfind('@') {
            Some(later) if !valid_host_port(host_port) => Some(strict_end + later),
            _ => strict_at,
        };
        let mut query_from = strict_end;
        if let Some(end) = userinfo_end {
            let userinfo = &rest[..end];
            if let Some(colon) = userinfo.find(':') {
                if colon + 1 < end {
                    parts.password = Some(rest_at + colon + 1..rest_at + end);
                }
            }
            if end > strict_end {
                query_from = end + rest[end..].find(['/', '?', '#']).unwrap_or(rest.len() - end);
            }
        }
        // The query: after the first '?' (past the authority), up to '#'.
        let after = &rest[query_from..];
        if let Some(q) = after.find('?') {
            let q_at = rest_at + query_from + q + 1;
            let query = &url[q_at..];
            let query = &query[..query.find('#').unwrap_or(query.len())];
            let mut at = q_at;
            for pair in query.split('&') {
                if let Some(eq) = pair.find('=') {
                    let name = percent_decode(&pair[..eq].replace('+', " "));
                    if is_secret_param(&name) && eq + 1 < pair.len() {
                        parts.query.push(at + eq + 1..at + pair.len());
                    }
                }
                at += pair.len() + 1;
            }
        }
        parts
    }

    /// All secret ranges, in order (they never overlap: the password ends before the query starts).
    fn secrets(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.password.iter().cloned().chain(self.query.iter().cloned())
    }
}

/// Whether `authority` (no '@') reads as a host with an optional numeric port.
fn valid_host_port(authority: &str) -> bool {
    let port = match authority.strip_prefix('[') {
        // [IPv6]:port
        Some(v6) => match v6.find(']') {
            Some(close) => match &v6[close + 1..] {
                "" => return true,
                p => match p.strip_prefix(':') {
                    Some(port) => port,
                    None => return false,
                },
            },
            None => return false,
        },
        None => match authority.rfind(':') {
            Some(colon) if !authority[..colon].contains(':') => &authority[colon + 1..],
            Some(_) => return false,
            None => return true,
        },
    };
    port.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_password_and_only_the_password() {
        let cases = [
            ("postgres://user:pass@host/db", "postgres://user:***@host/db"),
            ("postgres://user:pass@host:5432/db", "postgres://user:***@host:5432/db"),
            (
                "postgresql://agora:s3cr%40t@db.example.com:6543/agora?sslmode=require",
                "postgresql://agora:***@db.example.com:6543/agora?sslmode=require",
            ),
            ("postgres://user:p@ss@host/db", "postgres://user:***@host/db"),
            ("postgres://user:pa:ss@host/db", "postgres://user:***@host/db"),
            ("postgres://user:pass@[::1]:5432/db", "postgres://user:***@[::1]:5432/db"),
            ("postgres://user:pass@host", "postgres://user:***@host"),
            ("postgres://user:pass@host?sslmode=disable", "postgres://user:***@host?sslmode=disable"),
            ("POSTGRES://User:Pass@HOST/DB", "POSTGRES://User:***@HOST/DB"),
            ("postgres://:pass@host/db", "postgres://:***@host/db"),
            ("mysql://root:toor@localhost/x", "mysql://root:***@localhost/x"),
            // Unescaped '/', '?' or '#' in a password: an invalid URL, still masked.
            ("postgres://user:pa/ss@host/db", "postgres://user:***@host/db"),
            ("postgres://user:pa?ss@host/db", "postgres://user:***@host/db"),
            ("postgres://user:pa#ss@host/db", "postgres://user:***@host/db"),
            ("postgres://us@er:pa/ss@host/db", "postgres://us@er:***@host/db"),
            // Query secrets.
            (
                "postgres://host/db?user=u&password=pw&sslmode=require",
                "postgres://host/db?user=u&password=***&sslmode=require",
            ),
            ("postgres://u:a@host/db?pass=b#frag", "postgres://u:***@host/db?pass=***#frag"),
            (
                "postgres://host/db?sslpassword=k&PassWord=x&passwordx=y",
                "postgres://host/db?sslpassword=***&PassWord=***&passwordx=y",
            ),
            ("postgres://host/db?pass%77ord=x", "postgres://host/db?pass%77ord=***"),
            ("postgres://host/db?password=&a=1", "postgres://host/db?password=&a=1"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn leaves_urls_without_secrets_unchanged() {
        for url in [
            "postgres://user@host/db",
            "postgres://host:5432/db",
            "postgres://user:@host/db",
            "postgres://[::1]/db",
            "postgres://host/db@x",
            "postgres://user@host/db?sslmode=require&application_name=agora",
            "sqlite://coordinator.db?mode=rwc",
            "sqlite:///tmp/a:b@c/coordinator.db?mode=rwc",
            "sqlite://user:pass@weird-file-name.db",
            "sqlite::memory:",
            "SQLITE:data.db",
            "",
            "not a url",
            "user:pass@host",
            "://user:pass@host",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn garbage_never_panics_and_keeps_passwords_out() {
        let pieces = [
            "",
            ":",
            "@",
            "/",
            "?",
            "#",
            "&",
            "=",
            "%",
            "%4",
            "%zz",
            "[",
            "]",
            "://",
            "é",
            "🦀",
            "pw",
            "password=",
            "postgres",
        ];
        // Every string of up to 3 pieces.
        let mut strings = vec![String::new()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for s in &strings {
                for p in pieces {
                    next.push(format!("{s}{p}"));
                }
            }
            strings.extend(next);
            strings.sort();
            strings.dedup();
        }
        for s in &strings {
            for url in [s.clone(), format!("postgres://{s}"), format!("postgres://u:{s}@h/d?{s}")] {
                let redacted = redact_url(&url);
                let text = redact_text(&format!("error: {url}: bad"), &url);
                let _ = redact_error(anyhow::anyhow!("{url}"), &url);
                if let Ok(parsed) = url::Url::parse(&url) {
                    if let Some(pw) = parsed.password() {
                        assert!(!redacted.contains(&format!(":{pw}@")), "{url} -> {redacted}");
                        assert!(!text.contains(pw), "{url} -> {text}");
                    }
                }
            }
        }
    }

    #[test]
    fn agrees_with_the_url_crate_on_valid_urls() {
        for url in [
            "postgres://user:pass@host/db",
            "postgres://user:p@ss@host:1/db?x=1",
            "postgres://u:p%2Fq@[::1]:5432/db",
            "postgres://host/db?password=pw",
        ] {
            let redacted = url::Url::parse(&redact_url(url)).expect("still a URL");
            let original = url::Url::parse(url).unwrap();
            assert_eq!(redacted.username(), original.username());
            assert_eq!(redacted.host_str(), original.host_str());
            assert_eq!(redacted.port(), original.port());
            assert_eq!(redacted.path(), original.path());
            assert_eq!(redacted.password(), original.password().map(|_| MASK));
        }
    }

    #[test]
    fn text_loses_the_url_and_the_password() {
        let url = "postgres://agora:hunter2@db:5432/agora?sslpassword=k3y";
        let text = format!("cannot open the database {url}: password authentication failed (hunter2); key k3y");
        let cleaned = redact_text(&text, url);
        assert_eq!(
            cleaned,
            "cannot open the database postgres://agora:***@db:5432/agora?sslpassword=***: \
             password authentication failed (***); key ***"
        );
        // Percent-decoded, as `url::Url` and libpq show it.
        let url = "postgres://u:p%40ss%2Fw@h/d";
        assert_eq!(redact_text("bad password p@ss/w for u", url), "bad password *** for u");
        assert_eq!(redact_text("no secrets here", url), "no secrets here");
        // URLs without secrets change nothing.
        assert_eq!(
            redact_text("sqlite://a.db?mode=rwc: locked", "sqlite://a.db?mode=rwc"),
            "sqlite://a.db?mode=rwc: locked"
        );
        let err = redact_error(
            anyhow::anyhow!("connection to postgres://u:pw1234@h/d refused").context("cannot open"),
            "postgres://u:pw1234@h/d",
        );
        assert_eq!(format!("{err:#}"), "cannot open: connection to postgres://u:***@h/d refused");
    }
}
