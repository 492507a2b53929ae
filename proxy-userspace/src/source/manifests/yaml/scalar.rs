//! What a scalar is when nothing asks for a type: YAML 1.2's core schema, plus YAML 1.1's
//! `yes`/`no`/`on`/`off` booleans and `_` digit separators, as Kubernetes' YAML reader
//! (go-yaml) types them. A core-schema tag (`!!str 80`) decides instead.

use std::borrow::Cow;

use serde::de::Unexpected;

use super::{CoreTag, Scalar};

/// What an untyped scalar is.
pub(super) enum Resolved<'s> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'s str),
}

impl Scalar<'_> {
    pub(super) fn is_null(&self) -> bool {
        match self.tag {
            Some(tag) => tag == CoreTag::Null,
            None => self.plain && matches!(self.text.as_ref(), "" | "~" | "null" | "Null" | "NULL"),
        }
    }

    pub(super) fn resolve(&self) -> Resolved<'_> {
        let text = self.text.as_ref();
        match self.tag {
            Some(CoreTag::Str) => return Resolved::Str(text),
            Some(CoreTag::Null) => return Resolved::Null,
            Some(CoreTag::Bool) => {
                return parse_bool(text).map_or(Resolved::Str(text), Resolved::Bool);
            }
            Some(CoreTag::Int) => return parse_int(text).unwrap_or(Resolved::Str(text)),
            Some(CoreTag::Float) => {
                return parse_float(text).map_or(Resolved::Str(text), Resolved::Float);
            }
            None if !self.plain => return Resolved::Str(text),
            None => {}
        }
        if matches!(text, "" | "~" | "null" | "Null" | "NULL") {
            return Resolved::Null;
        }
        if let Some(value) = parse_bool(text) {
            return Resolved::Bool(value);
        }
        if let Some(number) = parse_int(text) {
            return number;
        }
        match parse_float(text) {
            Some(value) => Resolved::Float(value),
            None => Resolved::Str(text),
        }
    }

    /// Describes the scalar for a type error.
    pub(super) fn unexpected(&self) -> Unexpected<'_> {
        match self.resolve() {
            Resolved::Null => Unexpected::Unit,
            Resolved::Bool(value) => Unexpected::Bool(value),
            Resolved::Int(value) => Unexpected::Signed(value),
            Resolved::UInt(value) => Unexpected::Unsigned(value),
            Resolved::Float(value) => Unexpected::Float(value),
            Resolved::Str(text) => Unexpected::Str(text),
        }
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// Decimal (with `_` separators), `0x` and `0o` integers, signed or not.
fn parse_int(text: &str) -> Option<Resolved<'static>> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = if let Some(hex) = digits.strip_prefix("0x") {
        (16, hex)
    } else if let Some(octal) = digits.strip_prefix("0o") {
        (8, octal)
    } else {
        (10, digits)
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || !digits
            .bytes()
            .all(|b| b == b'_' || (b as char).is_digit(radix))
    {
        return None;
    }
    let cleaned: Cow<str> = if digits.contains('_') {
        Cow::Owned(digits.replace('_', ""))
    } else {
        Cow::Borrowed(digits)
    };
    let magnitude = u64::from_str_radix(&cleaned, radix).ok()?;
    if negative {
        let value = 0i64.checked_sub_unsigned(magnitude)?;
        Some(Resolved::Int(value))
    } else {
        Some(match i64::try_from(magnitude) {
            Ok(value) => Resolved::Int(value),
            Err(_) => Resolved::UInt(magnitude),
        })
    }
}

fn parse_float(text: &str) -> Option<f64> {
    match text.trim_start_matches(['+', '-']) {
        ".inf" | ".Inf" | ".INF" => {
            return Some(if text.starts_with('-') {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            });
        }
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let first = text.trim_start_matches(['+', '-']).bytes().next()?;
    if !(first.is_ascii_digit() || first == b'.') {
        return None;
    }
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || b"+-.eE_".contains(&b))
    {
        return None;
    }
    if text.contains('_') {
        text.replace('_', "").parse().ok()
    } else {
        text.parse().ok()
    }
}
