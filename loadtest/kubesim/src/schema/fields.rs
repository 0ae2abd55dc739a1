//! Field errors, rendered like apimachinery's `field.Error`.

use super::*;

/// A nil `*field.Path` renders as `<nil>`; the apiserver validates from a nil root, so errors
/// about the object itself (root CEL rules, composite schema failures) carry that field.
pub(super) fn field_name(path: &str) -> String {
    if path.is_empty() {
        "<nil>".to_string()
    } else {
        path.to_string()
    }
}

pub(super) fn with_detail(mut s: String, detail: &str) -> String {
    if !detail.is_empty() {
        s.push_str(": ");
        s.push_str(detail);
    }
    s
}

pub(super) fn cause(reason: &'static str, path: &str, message: String) -> Cause {
    Cause {
        reason,
        field: field_name(path),
        message,
    }
}

/// `value` is already rendered (see [`go_value`]).
pub(super) fn invalid(path: &str, value: &str, detail: &str) -> Cause {
    cause(
        INVALID,
        path,
        with_detail(format!("Invalid value: {value}"), detail),
    )
}

pub(super) fn type_invalid(path: &str, value: &str, detail: &str) -> Cause {
    cause(
        TYPE_INVALID,
        path,
        with_detail(format!("Invalid value: {value}"), detail),
    )
}

pub(super) fn required(path: &str, detail: &str) -> Cause {
    cause(
        REQUIRED,
        path,
        with_detail("Required value".to_string(), detail),
    )
}

pub(super) fn forbidden(path: &str, detail: &str) -> Cause {
    cause(
        FORBIDDEN,
        path,
        with_detail("Forbidden".to_string(), detail),
    )
}

pub(super) fn duplicate(path: &str, value: &str) -> Cause {
    cause(DUPLICATE, path, format!("Duplicate value: {value}"))
}

pub(super) fn not_supported(path: &str, value: &str, supported: &[String]) -> Cause {
    let mut msg = format!("Unsupported value: {value}");
    if !supported.is_empty() {
        let quoted: Vec<String> = supported.iter().map(|s| go_quote(s)).collect();
        msg.push_str(": supported values: ");
        msg.push_str(&quoted.join(", "));
    }
    cause(NOT_SUPPORTED, path, msg)
}

/// Since 1.32 the apiserver reports maxLength with `field.TooLong`, which omits the value and
/// says "bytes" even though kube-openapi counted characters.
pub(super) fn too_long(path: &str, max: i64) -> Cause {
    let msg = if max >= 0 {
        format!("Too long: may not be more than {max} bytes")
    } else {
        "Too long: value is too long".to_string()
    };
    cause(TOO_LONG, path, msg)
}

pub(super) fn too_many(path: &str, actual: i64, max: i64) -> Cause {
    cause(
        TOO_MANY,
        path,
        format!("Too many: {actual}: must have at most {max} items"),
    )
}

pub(super) fn blocking_cause() -> Cause {
    invalid(
        "",
        "\"null\"",
        "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
    )
}

pub(super) fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

pub(super) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

pub(super) fn key(path: &str, k: &str) -> String {
    format!("{path}[{k}]")
}
