//! `env_file` contents: `KEY=VALUE` lines, `#` comments, blank lines and optional quotes.

use std::collections::BTreeMap;

/// Parses an env file's text. A bare `KEY` line takes the value from this process's environment
/// (as `docker run --env-file` does) and is skipped when unset. Returns the 1-based line and the
/// reason for the first malformed line.
pub(crate) fn parse_env_file(text: &str) -> Result<BTreeMap<String, String>, (usize, String)> {
    let mut vars = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(line);
        let (key, value) = match line.split_once('=') {
            Some((key, value)) => (key.trim(), Some(value.trim())),
            None => (line, None),
        };
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            return Err((
                line_no,
                format!("{key:?} is not a variable name (expected KEY=VALUE)"),
            ));
        }
        match value {
            Some(value) => {
                let value = unquote(value).map_err(|reason| (line_no, reason))?;
                vars.insert(key.to_string(), value);
            }
            None => {
                if let Ok(from_env) = std::env::var(key) {
                    vars.insert(key.to_string(), from_env);
                }
            }
        }
    }
    Ok(vars)
}

/// Strips matching quotes. Double quotes understand `\n`, `\"` and `\\`; single quotes are
/// literal. Unquoted values end at an inline ` #` comment.
fn unquote(value: &str) -> Result<String, String> {
    if let Some(inner) = value.strip_prefix('\'') {
        return inner
            .strip_suffix('\'')
            .map(str::to_string)
            .ok_or_else(|| "unterminated single quote".to_string());
    }
    if let Some(inner) = value.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or_else(|| "unterminated double quote".to_string())?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(ch @ ('"' | '\\')) => out.push(ch),
                Some(ch) => {
                    out.push('\\');
                    out.push(ch);
                }
                None => out.push('\\'),
            }
        }
        return Ok(out);
    }
    let without_comment = value.split(" #").next().unwrap_or(value);
    Ok(without_comment.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let text = "# comment\n\nA=1\nexport B = two words \nC=\"quoted # not comment\\n\"\nD='single $x'\nE=plain # trailing\nF=\n";
        let vars = parse_env_file(text).unwrap();
        let want: BTreeMap<String, String> = [
            ("A", "1"),
            ("B", "two words"),
            ("C", "quoted # not comment\n"),
            ("D", "single $x"),
            ("E", "plain"),
            ("F", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(vars, want);
    }

    #[test]
    fn bare_key_reads_process_env() {
        let vars = parse_env_file("PATH\nFLOTILLA_SURELY_UNSET_VARIABLE\n").unwrap();
        assert_eq!(vars.get("PATH"), std::env::var("PATH").ok().as_ref());
        assert!(!vars.contains_key("FLOTILLA_SURELY_UNSET_VARIABLE"));
    }

    #[test]
    fn reports_bad_line() {
        assert_eq!(parse_env_file("A=1\n=2\n").unwrap_err().0, 2);
        assert_eq!(parse_env_file("A=\"open\n").unwrap_err().0, 1);
        assert_eq!(parse_env_file("BAD KEY=1\n").unwrap_err().0, 1);
    }
}
