//! What counts as a secret, and every rule that masks one: the one place the log, the inspector's
//! views, HAR and the capture learn it from.
//!
//! - **Header fields** whose values are credentials ([`is_secret_field`]): tokens, `Authorization`,
//!   cookies. Their values are shown as [`MASKED`].
//! - **Words** that name a secret ([`SECRET_WORDS`]): a JSON field whose name contains one is masked
//!   with everything under it, and so is the `value` of a JSON-patch operation whose `path` names
//!   one (glance's PATCH), and a query parameter whose name does.
//! - **Values**: a secret field's value (a token) is masked wherever else it appears, in bodies
//!   too (an upstream that echoes a request's headers back).
//! - **Bytes that cannot be masked** (not JSON, or cut short) and name a secret are left out whole
//!   ([`Safe::Withheld`]).

use std::borrow::Cow;

use http::HeaderMap;
use serde_json::Value;

/// What a secret value is replaced with.
pub const MASKED: &str = "<masked>";

/// Header fields whose values are credentials (lower-case).
pub const SECRET_FIELDS: [&str; 7] = [
    "x-auth-token",
    "x-subject-token",
    "x-service-token",
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// Words that name a secret in a JSON field, a query parameter or any bytes, in any case.
pub const SECRET_WORDS: [&str; 4] = ["password", "token", "secret", "credential"];

/// True for a header field (lower-case name) whose value is a credential.
pub fn is_secret_field(name: &str) -> bool {
    SECRET_FIELDS.contains(&name)
}

/// True for a JSON field or query parameter whose name says its value is a secret.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|word| name.contains(word))
}

/// A header value as it may be shown: [`MASKED`] for a secret field, printable text otherwise.
pub fn shown<'a>(name: &str, value: &'a [u8]) -> Cow<'a, str> {
    if is_secret_field(name) {
        Cow::Borrowed(MASKED)
    } else {
        crate::correlation::printable(value)
    }
}

/// The fields for the log's arrival line: `name: value; ...`, secret values masked.
pub fn for_log(headers: &HeaderMap) -> String {
    let fields: Vec<String> = headers
        .iter()
        .map(|(name, value)| format!("{name}: {}", shown(name.as_str(), value.as_bytes())))
        .collect();
    fields.join("; ")
}

/// `name:value` lines (as the record keeps a head) with each secret field's value masked; the
/// values masked, and their words, are added to `secrets` (see [`secret_values`]).
pub fn head_lines<'a>(lines: &'a [u8], secrets: &mut Vec<String>) -> Cow<'a, [u8]> {
    let is_secret_line = |line: &[u8]| {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        std::str::from_utf8(name).is_ok_and(is_secret_field)
    };
    if !lines.split(|&b| b == b'\n').any(is_secret_line) {
        return Cow::Borrowed(lines);
    }
    let mut out = Vec::with_capacity(lines.len());
    for line in lines.split_inclusive(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        match text.iter().position(|&b| b == b':') {
            Some(colon) if is_secret_line(text) => {
                add_secret(&text[colon + 1..], secrets);
                out.extend_from_slice(&text[..=colon]);
                out.extend_from_slice(MASKED.as_bytes());
                out.push(b'\n');
            }
            _ => out.extend_from_slice(line),
        }
    }
    Cow::Owned(out)
}

/// The values of the secret fields among `fields` (a token, say), and their words: masked wherever
/// else they appear. Values shorter than 8 bytes are too short to look for safely, and too short
/// to be a token.
pub fn secret_values<'a>(fields: impl Iterator<Item = (&'a str, &'a [u8])>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, value) in fields {
        if is_secret_field(name) {
            add_secret(value, &mut out);
        }
    }
    out
}

/// Adds a secret field's value, and its words, to `out`.
fn add_secret(value: &[u8], out: &mut Vec<String>) {
    let value = String::from_utf8_lossy(value);
    let value = value.trim();
    let words = value.split([' ', ';', ',', '=']);
    for v in std::iter::once(value).chain(words) {
        if v.len() >= 8 && v != MASKED && !out.iter().any(|o| o == v) {
            out.push(v.to_owned());
        }
    }
}

/// Masks every secret in `v`: under a field whose name says secret, or set by a JSON-patch operation
/// whose path does, and every occurrence of `secrets` in its strings.
pub fn mask_json(v: &mut Value, secrets: &[String]) {
    mask_fields(v, false);
    mask_values(v, secrets);
}

/// Masks the values under secret fields; `under_secret` masks every value.
fn mask_fields(v: &mut Value, under_secret: bool) {
    match v {
        Value::Object(map) => {
            // A JSON-patch operation (glance's PATCH): its `path` names the field its `value` sets.
            let patches_secret = map.contains_key("op")
                && map
                    .get("path")
                    .and_then(Value::as_str)
                    .is_some_and(|p| is_secret_name(p.rsplit('/').next().unwrap_or(p)));
            for (name, value) in map.iter_mut() {
                let secret = is_secret_name(name) || (patches_secret && name == "value");
                mask_fields(value, under_secret || secret);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| mask_fields(i, under_secret)),
        Value::Null => {}
        scalar => {
            if under_secret {
                *scalar = Value::String(MASKED.to_owned());
            }
        }
    }
}

/// Masks every occurrence of `secrets` in the strings of `v`.
fn mask_values(v: &mut Value, secrets: &[String]) {
    match v {
        Value::String(s) => {
            for secret in secrets {
                if s.contains(secret.as_str()) {
                    *s = s.replace(secret.as_str(), MASKED);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| mask_values(i, secrets)),
        Value::Object(map) => map.values_mut().for_each(|i| mask_values(i, secrets)),
        _ => {}
    }
}

/// The target with the value of every query parameter that names a secret masked.
pub fn target(target: &str) -> Cow<'_, str> {
    let Some((path, query)) = target.split_once('?') else {
        return Cow::Borrowed(target);
    };
    let secret = |kv: &str| {
        let name = kv.split_once('=').map_or(kv, |(k, _)| k);
        form_urlencoded::parse(name.as_bytes())
            .next()
            .is_some_and(|(n, _)| is_secret_name(&n))
    };
    if !query.split('&').any(secret) {
        return Cow::Borrowed(target);
    }
    let masked: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if secret(kv) => format!("{k}=%3Cmasked%3E"),
            _ => kv.to_owned(),
        })
        .collect();
    Cow::Owned(format!("{path}?{}", masked.join("&")))
}

/// What of a body's bytes may leave the process (in an archive, or a capture file on disk).
#[derive(Debug, PartialEq, Eq)]
pub enum Safe<'a> {
    /// The bytes as they were.
    Bytes(&'a [u8]),
    /// A JSON body kept whole, re-serialised with its secret values masked.
    Masked(Vec<u8>),
    /// Bytes that name a secret which could not be masked in them (not JSON, or cut): left out.
    Withheld,
}

/// The rule for [`Safe`]: a JSON body kept whole (`complete`) is masked field by field, and left as
/// it was when nothing in it is secret; any other bytes are left out if they name a secret or hold
/// one of `secrets`, and are kept as they are otherwise.
pub fn body<'a>(
    content_type: Option<&str>,
    bytes: &'a [u8],
    complete: bool,
    secrets: &[String],
) -> Safe<'a> {
    let lower = bytes.to_ascii_lowercase();
    let names_a_secret = SECRET_WORDS
        .iter()
        .any(|word| memchr::memmem::find(&lower, word.as_bytes()).is_some());
    let holds_a_value = secrets
        .iter()
        .any(|s| memchr::memmem::find(bytes, s.as_bytes()).is_some());
    // `\u` escapes could spell a secret's word or value where the search above cannot see it.
    let escaped = memchr::memmem::find(bytes, b"\\u").is_some();
    if !names_a_secret && !holds_a_value && !escaped {
        return Safe::Bytes(bytes);
    }
    let is_json = content_type.is_some_and(is_json);
    if complete
        && is_json
        && let Ok(mut json) = serde_json::from_slice::<Value>(bytes)
    {
        let before = json.clone();
        mask_json(&mut json, secrets);
        return match json == before {
            true => Safe::Bytes(bytes),
            false => Safe::Masked(json.to_string().into_bytes()),
        };
    }
    match names_a_secret || holds_a_value {
        true => Safe::Withheld,
        false => Safe::Bytes(bytes),
    }
}

/// True for a content type that says JSON (`application/json`, glance's
/// `application/openstack-images-v2.1-json-patch`, ...).
pub fn is_json(content_type: &str) -> bool {
    content_type.to_ascii_lowercase().contains("json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_in_json_are_masked_at_any_depth() {
        let mut v = json!({
            "auth": {"identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"id": "default"}, "password": "s3cret"}}}},
            "application_credential": {"id": "abc", "secret": "s4"},
            "os_token": "s5",
            "Client_Secret": 42,
            "items": [{"token": "s6"}, {"name": "ok"}],
            "name": "cirros",
            "none": null,
            "patch": [{"op": "add", "path": "/db_password", "value": "s7"},
                      {"op": "replace", "path": "/name", "value": "new"}],
            "echo": "Bearer gAAAAAtokenvalue"
        });
        mask_json(&mut v, &["gAAAAAtokenvalue".to_owned()]);
        let text = v.to_string();
        for s in [
            "s3cret", "s4", "s5", "42", "s6", "s7", "admin", "abc", "gAAAAA",
        ] {
            assert!(!text.contains(s), "{s} leaked: {text}");
        }
        assert_eq!(v["name"], "cirros");
        assert_eq!(v["items"][1]["name"], "ok");
        assert_eq!(v["auth"]["identity"]["methods"][0], "password");
        assert_eq!(v["none"], Value::Null);
        assert_eq!(v["patch"][1]["value"], "new");
        assert_eq!(v["echo"], "Bearer <masked>");
    }

    #[test]
    fn a_body_is_kept_masked_or_withheld() {
        let token = vec!["gAAAAAtokenvalue".to_owned()];
        let json = Some("application/json");
        assert_eq!(
            body(json, b"{\"name\":\"cirros\"}", true, &token),
            Safe::Bytes(b"{\"name\":\"cirros\"}")
        );
        let Safe::Masked(masked) = body(json, b"{\"Password\":\"x\"}", true, &token) else {
            panic!("a JSON body with a secret field is masked");
        };
        assert_eq!(masked, b"{\"Password\":\"<masked>\"}");
        // A JSON body that only mentions a secret word, with nothing to mask, goes as it was.
        assert_eq!(
            body(json, b"{\"methods\":[\"password\"]}", true, &token),
            Safe::Bytes(b"{\"methods\":[\"password\"]}")
        );
        for (content_type, bytes, complete) in [
            (json, &b"{\"password\": \"x\""[..], false),
            (Some("text/plain"), b"TOKEN=abc", true),
            (None, b"echo gAAAAAtokenvalue", true),
            (Some("text/plain"), b"\\u0070assword", true),
        ] {
            let safe = body(content_type, bytes, complete, &token);
            let escaped_only = bytes.starts_with(b"\\u");
            if escaped_only {
                assert_eq!(safe, Safe::Bytes(bytes), "an escape alone names nothing");
            } else {
                assert_eq!(safe, Safe::Withheld, "{}", String::from_utf8_lossy(bytes));
            }
        }
    }

    #[test]
    fn a_head_is_masked_line_by_line_and_its_secrets_found() {
        let mut secrets = Vec::new();
        let plain = b"host:controller\ncontent-type:application/json\n";
        assert!(matches!(head_lines(plain, &mut secrets), Cow::Borrowed(_)));
        let lines =
            b"host:controller\nx-auth-token:gAAAAAtokenvalue\ncookie:session=cookievalue1\n";
        let masked = head_lines(lines, &mut secrets);
        assert_eq!(
            &*masked,
            b"host:controller\nx-auth-token:<masked>\ncookie:<masked>\n"
        );
        assert_eq!(
            secrets,
            ["gAAAAAtokenvalue", "session=cookievalue1", "cookievalue1"]
        );
    }

    #[test]
    fn query_values_that_name_a_secret_are_masked() {
        assert_eq!(target("/v2/images"), "/v2/images");
        assert_eq!(
            target("/v2/images?limit=2&auth_token=abc&marker=x"),
            "/v2/images?limit=2&auth_token=%3Cmasked%3E&marker=x"
        );
    }

    #[test]
    fn secrets_never_reach_the_log_text() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("x-auth-token", "gAAAAAsecret1"),
            ("x-subject-token", "secret2"),
            ("x-service-token", "secret3"),
            ("authorization", "Bearer secret4"),
            ("proxy-authorization", "Basic secret5"),
            ("cookie", "session=secret6"),
            ("set-cookie", "session=secret7"),
            ("content-type", "application/json"),
        ] {
            h.append(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
        }
        let line = for_log(&h);
        assert!(!line.contains("secret"), "{line}");
        assert_eq!(line.matches("<masked>").count(), 7, "{line}");
        assert!(line.contains("content-type: application/json"), "{line}");
    }
}
