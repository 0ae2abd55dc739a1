//! Regular expressions: the schema's `pattern`s, with Go's (RE2) syntax.

use super::*;

/// Compiles a Go (RE2) pattern with the `regex` crate. The syntaxes nearly coincide; what
/// differs is patched here: Go's `\d`, `\w`, `\s` and `\b` are ASCII-only while Rust's are
/// Unicode, and Rust gives meaning to `[` inside classes, `&&`/`~~` and stray braces, which Go
/// reads literally.
pub(super) fn go_regex(pattern: &str) -> Result<Regex, regex::Error> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut in_class = false;
    let mut class_start = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        let at_class_start = class_start;
        class_start = false;
        match c {
            '\\' => {
                let Some(&n) = chars.get(i) else {
                    out.push('\\');
                    break;
                };
                i += 1;
                let replacement = match (n, in_class) {
                    ('d', false) => Some("[0-9]"),
                    ('d', true) => Some("0-9"),
                    ('D', false) => Some("[^0-9]"),
                    ('w', false) => Some("[0-9A-Za-z_]"),
                    ('w', true) => Some("0-9A-Za-z_"),
                    ('W', false) => Some("[^0-9A-Za-z_]"),
                    ('s', false) => Some("[\\t\\n\\f\\r ]"),
                    ('s', true) => Some("\\t\\n\\f\\r "),
                    ('S', false) => Some("[^\\t\\n\\f\\r ]"),
                    ('b', false) => Some("(?-u:\\b)"),
                    ('B', false) => Some("(?-u:\\B)"),
                    _ => None,
                };
                match replacement {
                    Some(r) => out.push_str(r),
                    None => {
                        out.push('\\');
                        out.push(n);
                    }
                }
            }
            '[' if !in_class => {
                in_class = true;
                out.push('[');
                if chars.get(i) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
                class_start = true;
            }
            '[' if chars.get(i) == Some(&':') => {
                // A POSIX class such as [:alpha:], copied through its closing ":]".
                out.push('[');
                while i < chars.len() {
                    out.push(chars[i]);
                    if chars[i] == ']' && chars.get(i.wrapping_sub(1)) == Some(&':') {
                        i += 1;
                        break;
                    }
                    i += 1;
                }
            }
            '[' | '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            ']' if in_class && !at_class_start => {
                in_class = false;
                out.push(']');
            }
            '{' if !in_class => match repetition_len(&chars[i..]) {
                Some(len) => {
                    out.push('{');
                    out.extend(&chars[i..i + len]);
                    i += len;
                }
                None => out.push_str("\\{"),
            },
            '}' if !in_class => out.push_str("\\}"),
            _ => out.push(c),
        }
    }
    Regex::new(&out)
}

/// Length of `n}`, `n,}` or `n,m}` at the start of `rest`, when it is a repetition.
pub(super) fn repetition_len(rest: &[char]) -> Option<usize> {
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while rest.get(*i).is_some_and(char::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return None;
    }
    if rest.get(i) == Some(&',') {
        i += 1;
        digits(&mut i);
    }
    (rest.get(i) == Some(&'}')).then_some(i + 1)
}
