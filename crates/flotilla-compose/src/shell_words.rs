//! Splitting a `command:` string into argv the way a POSIX shell would, without running one.
//! Not `shlex`/`shell-words`: both drop a word-initial `#` as a comment, which Compose (Go's
//! go-shellwords) passes on as an argument, and neither says which quote was left open.

/// Splits `input` on unquoted whitespace. Single quotes keep everything literally; double quotes
/// allow `\"`, `\\`, `\$` and `` \` `` escapes; a backslash outside quotes escapes the next
/// character. Returns the reason on failure (an unterminated quote or trailing backslash).
pub(crate) fn split(input: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    // Distinguishes `''` (an empty argument) from no argument at all.
    let mut in_word = false;
    let mut chars = input.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => return Err("unterminated single quote".to_string()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => word.push(ch),
                            Some(ch) => {
                                word.push('\\');
                                word.push(ch);
                            }
                            None => return Err("unterminated double quote".to_string()),
                        },
                        Some(ch) => word.push(ch),
                        None => return Err("unterminated double quote".to_string()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(ch) => word.push(ch),
                    None => return Err("ends with a lone backslash".to_string()),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_a_shell() {
        let cases: [(&str, &[&str]); 7] = [
            ("echo hello  world", &["echo", "hello", "world"]),
            (
                r#"sh -c "echo \"hi there\"""#,
                &["sh", "-c", r#"echo "hi there""#],
            ),
            ("a 'b c' d", &["a", "b c", "d"]),
            (r"a\ b c", &["a b", "c"]),
            ("x '' y", &["x", "", "y"]),
            ("   ", &[]),
            // As Compose: `#` starts no comment.
            ("echo a#b #c", &["echo", "a#b", "#c"]),
        ];
        for (input, want) in cases {
            assert_eq!(split(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn rejects_unterminated() {
        assert!(split("echo 'oops").unwrap_err().contains("single quote"));
        assert!(split("echo \"oops").unwrap_err().contains("double quote"));
        assert!(split("echo \\").unwrap_err().contains("backslash"));
    }
}
