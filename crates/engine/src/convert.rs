//! BSON → JSON conversion for the indexing hot path.
//!
//! This module owns turning the raw BSON documents read from MongoDB (snapshot cursors and
//! change-stream `fullDocument`s) into the JSON text that goes into Elasticsearch bulk requests,
//! and turning a MongoDB `_id` into an Elasticsearch `_id`.
//!
//! It walks the raw bytes of the document (`&RawDocument`) itself, without bson's element
//! iterator, and appends JSON straight into a caller-owned `Vec<u8>`: no owned `Document`, no
//! `serde_json::Value` tree and no per-field allocation. Every length is bounds-checked and
//! every key and string is checked to be UTF-8. Integers go through `itoa`, doubles through
//! `ryu`, and strings are copied eight bytes at a time, with only `"`, `\` and control
//! characters escaped.
//!
//! # Type mapping (document values → `_source` JSON)
//!
//! | BSON type | JSON written | Notes |
//! |---|---|---|
//! | Double | number, shortest text that reads back to the same value (`1.5`, `1e300`) | Integral values keep a `.0` (`3.0`), so Elasticsearch's dynamic mapping makes the field a floating-point type instead of `long`. NaN, `Infinity` and `-Infinity` become `null`, because Elasticsearch rejects them; each one adds 1 to [`ConvertStats::non_finite_nulled`]. |
//! | String | string | `"`, `\` and control characters below U+0020 are escaped (`\n`, `\t`, `\r`, `\b`, `\f`, otherwise `\u00XX`). Everything else, U+2028/U+2029 included, is copied as UTF-8. |
//! | Embedded document | object | Keys are kept in their BSON order. |
//! | Array | array | |
//! | Int32, Int64 | number | All digits, with no loss of precision. |
//! | Boolean | `true` / `false` | |
//! | Null, Undefined | `null` | |
//! | ObjectId | string of 24 lower-case hex digits | `"5f1d7a3b9c0e4b2a1c3d4e5f"` |
//! | DateTime | string `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, millisecond precision) | For years outside 0000–9999 (which an ISO-8601 date of this form cannot express) the value is written instead as a number: milliseconds since the Unix epoch. A `date` field with Elasticsearch's default format accepts both, since that format is `strict_date_optional_time` or `epoch_millis`. |
//! | Timestamp | object `{"t": <seconds>, "i": <increment>}` | |
//! | Binary, subtype 4 (UUID) or 3 (legacy UUID), 16 bytes | string `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (lower-case) | The bytes are printed in stored order. For subtype 3 this means that legacy C#/Java byte orders are not rearranged. |
//! | Binary, any other subtype or length | string, standard base64 with padding | For the old binary subtype 2, the inner length prefix is not included. |
//! | Regular expression | string `/pattern/options` | |
//! | JavaScript code | string holding the code | |
//! | JavaScript code with scope | string holding the code | The scope is dropped. |
//! | Symbol | string | |
//! | Decimal128 | string holding the canonical decimal text (`"1.5"`, `"-0"`, `"1E+3"`, `"NaN"`) | A string so that no precision is lost. Under dynamic mapping Elasticsearch makes the field `text` plus a `.keyword` subfield. An explicit numeric mapping (`double`, `scaled_float`) makes Elasticsearch parse the string as a number. |
//! | DbPointer (deprecated) | object `{"$ref": "<namespace>", "$id": "<24 hex digits>"}` | |
//! | MinKey / MaxKey | object `{"$minKey": 1}` / `{"$maxKey": 1}` | These are rare internal sentinels, and an object keeps them distinct from real data. |
//!
//! # Elasticsearch `_id` mapping ([`write_es_id`], [`es_id_string`])
//!
//! | `_id` BSON type | Elasticsearch `_id` |
//! |---|---|
//! | ObjectId | 24 lower-case hex digits |
//! | String | the string itself |
//! | Int32, Int64 | decimal digits (`5`, `-12`) |
//! | Double | Integral values in the `i64` range are written as decimal digits with no `.0` (`5.0` → `5`, `-0.0` → `0`). This way `5`, `5` (Int64) and `5.0`, which MongoDB counts as the same `_id`, map to one Elasticsearch document. Other finite values get the shortest round-trip text (`2.5`, `1e20`). NaN and the infinities become `NaN`, `Infinity` and `-Infinity`. |
//! | Decimal128 | canonical decimal text (`1.5`, `1E+3`). This is not unified with the numeric types, so `NumberDecimal("5")` gives `5` but `NumberDecimal("5.0")` gives `5.0`. |
//! | anything else (document, Binary/UUID, DateTime, Boolean, Null, Timestamp, …) | its canonical *relaxed* Extended JSON v2 text, written by this module with no whitespace and keys in BSON order, e.g. `{"a":1,"b":"x"}`, `{"$binary":{"base64":"…","subType":"04"}}`, `{"$date":"2024-01-02T03:04:05.006Z"}` (years 1970–9999; otherwise `{"$date":{"$numberLong":"…"}}`), `true`, `null`. Non-finite doubles nested in such a value are written as `{"$numberDouble":"NaN"}` and similar. Integral doubles nested in it keep their `.0`. |
//!
//! Elasticsearch limits `_id` to 512 bytes of UTF-8 ([`MAX_ES_ID_BYTES`]). A longer id is an
//! [`Error::IdTooLong`]. The mapping is injective within one BSON type. Across types it can
//! collide (the string `"5"` and the integer `5`, or a 24-hex string and the equivalent
//! ObjectId), which is acceptable because a collection almost always uses a single `_id` type.

use std::io::Write as _;

use mongodb::bson::{oid::ObjectId, Decimal128, RawBsonRef, RawDbPointerRef, RawDocument};

/// Elasticsearch rejects `_id`s longer than this many bytes of UTF-8.
pub const MAX_ES_ID_BYTES: usize = 512;

/// Maximum nesting of documents/arrays we follow. MongoDB itself stores at most 100 levels. The
/// bound keeps a hostile or corrupt buffer from overflowing the stack through recursion.
pub(crate) const MAX_DEPTH: usize = 200;

/// Counters of lossy conversions, so the engine can expose them as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConvertStats {
    /// Doubles that were NaN or ±Infinity and were written as `null`.
    pub non_finite_nulled: u64,
}

/// Why a conversion failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The BSON bytes are not a valid document (bad lengths, invalid UTF-8, unknown element
    /// type, or nesting deeper than 200 levels).
    #[error("malformed BSON: {0}")]
    Malformed(String),
    /// The `_id` maps to an Elasticsearch `_id` of this many bytes, which is more than
    /// [`MAX_ES_ID_BYTES`].
    #[error("_id maps to an Elasticsearch _id of {0} bytes; Elasticsearch allows at most 512")]
    IdTooLong(usize),
}

fn malformed(e: impl std::fmt::Display) -> Error {
    Error::Malformed(e.to_string())
}

pub(crate) fn too_deep() -> Error {
    Error::Malformed(format!("nesting deeper than {MAX_DEPTH} levels"))
}

// ---------------------------------------------------------------------------------------------
// Documents and values
// ---------------------------------------------------------------------------------------------

/// Write `doc` as a JSON object into `out`. If `skip_id` is true the top-level `_id` field is
/// omitted (Elasticsearch's `_source` must not contain `_id`).
///
/// On error, `out` and `stats` are restored to their state before the call, so a bulk buffer
/// never holds half a document.
pub fn write_document(
    doc: &RawDocument,
    skip_id: bool,
    out: &mut Vec<u8>,
    stats: &mut ConvertStats,
) -> Result<(), Error> {
    let start = out.len();
    let saved = *stats;
    // The JSON is usually about as long as the BSON, so one up-front reservation avoids most
    // growth steps while we push small pieces.
    out.reserve(doc.as_bytes().len());
    let result = write_doc_at(doc.as_bytes(), skip_id, 0, out, stats);
    if result.is_err() {
        out.truncate(start);
        *stats = saved;
    }
    result
}

/// Write a single BSON value as JSON (used for fields and for nested values).
///
/// On error, `out` and `stats` are restored to their state before the call.
pub fn write_value(
    value: RawBsonRef<'_>,
    out: &mut Vec<u8>,
    stats: &mut ConvertStats,
) -> Result<(), Error> {
    let start = out.len();
    let saved = *stats;
    let result = write_value_at(value, 0, out, stats);
    if result.is_err() {
        out.truncate(start);
        *stats = saved;
    }
    result
}

// The hot path walks the document bytes itself instead of using bson's `RawIter`/`RawElement`.
// Those run `str::from_utf8` over every key and string, build a `RawBsonRef` per field and go
// through an error-context closure per element, which together cost more than writing the JSON.
// Here every length is still bounds-checked and every key and string must still be UTF-8 (the
// walker accepts exactly the documents bson's iterator accepts), but the UTF-8 check rides on
// the escape scan, and `from_utf8` runs only for text that is not pure ASCII.
//
// A document is `i32 total length, elements…, 0x00`. An element is `type byte, key (C string),
// value`. The value layouts are in [`read_element`].

/// A decoded element value. Strings are still raw bytes: their UTF-8 is checked when written.
pub(crate) enum Element<'a> {
    Double(f64),
    /// String, JavaScript code, Symbol, and the code of JavaScript code with scope.
    Str(&'a [u8]),
    /// A whole embedded document, length prefix and trailing NUL included.
    Document(&'a [u8]),
    /// A whole array, in the same form as a document.
    Array(&'a [u8]),
    Binary(u8, &'a [u8]),
    /// Null and Undefined.
    Null,
    ObjectId(&'a [u8; 12]),
    Boolean(bool),
    DateTime(i64),
    Regex(&'a [u8], &'a [u8]),
    DbPointer(&'a [u8], &'a [u8; 12]),
    Int32(i32),
    Timestamp {
        time: u32,
        increment: u32,
    },
    Int64(i64),
    Decimal128(&'a [u8; 16]),
    MinKey,
    MaxKey,
}

/// `N` bytes at `pos`.
#[inline(always)]
fn fixed<const N: usize>(bytes: &[u8], pos: usize) -> Result<&[u8; N], &'static str> {
    bytes
        .get(pos..pos + N)
        .and_then(|s| s.try_into().ok())
        .ok_or("value runs past the end of its document")
}

/// A non-negative `i32` length prefix at `pos`.
#[inline(always)]
fn length_at(bytes: &[u8], pos: usize) -> Result<usize, &'static str> {
    usize::try_from(i32::from_le_bytes(*fixed::<4>(bytes, pos)?)).map_err(|_| "negative length")
}

/// A BSON string (`i32` length including the NUL, bytes, NUL) at `pos`: its bytes without the
/// NUL, and the position after it.
#[inline(always)]
fn string_at(bytes: &[u8], pos: usize) -> Result<(&[u8], usize), &'static str> {
    let len = length_at(bytes, pos)?;
    let start = pos + 4;
    let end = start + len;
    match bytes.get(start..end) {
        Some([s @ .., 0]) => Ok((s, end)),
        Some(_) => Err("string is empty or not NUL-terminated"),
        None => Err("string runs past the end of its document"),
    }
}

/// A C string at `pos`: its bytes without the NUL, and the position after it.
#[inline(always)]
fn cstring_at(bytes: &[u8], pos: usize) -> Result<(&[u8], usize), &'static str> {
    let rest = bytes
        .get(pos..)
        .ok_or("value runs past the end of its document")?;
    let len = find_nul(rest).ok_or("C string without a terminating NUL")?;
    Ok((&rest[..len], pos + len + 1))
}

/// An embedded document or array at `pos`, as a whole (its header is checked when it is
/// walked), and the position after it.
#[inline(always)]
fn document_at(bytes: &[u8], pos: usize) -> Result<(&[u8], usize), &'static str> {
    let len = length_at(bytes, pos)?;
    let end = pos + len;
    let doc = bytes
        .get(pos..end)
        .ok_or("embedded document runs past the end of its document")?;
    Ok((doc, end))
}

/// The elements of a whole document (`i32` length, elements, NUL) after checking that the
/// declared length is the slice's length and that the terminating NUL is there.
#[inline(always)]
pub(crate) fn document_body(doc: &[u8]) -> Result<&[u8], &'static str> {
    match doc {
        [a, b, c, d, body @ .., 0]
            if usize::try_from(i32::from_le_bytes([*a, *b, *c, *d])) == Ok(doc.len()) =>
        {
            Ok(body)
        }
        _ => Err("document length does not match its contents or it is not NUL-terminated"),
    }
}

/// Decode the value of type `tag` that starts at `pos` in `body` (the elements of the enclosing
/// document, without its terminating NUL, so no value can run into or past that NUL). Returns
/// the value and the position after it.
#[inline(always)]
pub(crate) fn read_element(tag: u8, body: &[u8], pos: usize) -> Result<(Element<'_>, usize), &'static str> {
    Ok(match tag {
        0x01 => (
            Element::Double(f64::from_le_bytes(*fixed(body, pos)?)),
            pos + 8,
        ),
        // String, JavaScript code, Symbol.
        0x02 | 0x0d | 0x0e => {
            let (s, next) = string_at(body, pos)?;
            (Element::Str(s), next)
        }
        0x03 => {
            let (d, next) = document_at(body, pos)?;
            (Element::Document(d), next)
        }
        0x04 => {
            let (d, next) = document_at(body, pos)?;
            (Element::Array(d), next)
        }
        0x05 => {
            let len = length_at(body, pos)?;
            let subtype = *body
                .get(pos + 4)
                .ok_or("binary runs past the end of its document")?;
            let start = pos + 5;
            let next = start + len;
            let data = body
                .get(start..next)
                .ok_or("binary runs past the end of its document")?;
            let data = if subtype == 0x02 {
                // Old binary subtype 2: the data repeats its own length first.
                match data {
                    [a, b, c, d, inner @ ..]
                        if usize::try_from(i32::from_le_bytes([*a, *b, *c, *d]))
                            == Ok(inner.len()) =>
                    {
                        inner
                    }
                    _ => return Err("old binary subtype 2 with a wrong inner length"),
                }
            } else {
                data
            };
            (Element::Binary(subtype, data), next)
        }
        0x06 | 0x0a => (Element::Null, pos),
        0x07 => (Element::ObjectId(fixed(body, pos)?), pos + 12),
        0x08 => match fixed::<1>(body, pos)? {
            [0] => (Element::Boolean(false), pos + 1),
            [1] => (Element::Boolean(true), pos + 1),
            _ => return Err("boolean that is neither 0 nor 1"),
        },
        0x09 => (
            Element::DateTime(i64::from_le_bytes(*fixed(body, pos)?)),
            pos + 8,
        ),
        0x0b => {
            let (pattern, next) = cstring_at(body, pos)?;
            let (options, next) = cstring_at(body, next)?;
            (Element::Regex(pattern, options), next)
        }
        0x0c => {
            let (namespace, next) = string_at(body, pos)?;
            (Element::DbPointer(namespace, fixed(body, next)?), next + 12)
        }
        0x0f => {
            // i32 total length, string (the code), document (the scope).
            let len = length_at(body, pos)?;
            let next = pos + len;
            let all = body
                .get(pos..next)
                .ok_or("code with scope runs past the end of its document")?;
            let (code, scope_at) = string_at(all, 4)?;
            let scope = all.get(scope_at..).unwrap_or_default();
            document_body(scope)?;
            (Element::Str(code), next)
        }
        0x10 => (
            Element::Int32(i32::from_le_bytes(*fixed(body, pos)?)),
            pos + 4,
        ),
        0x11 => {
            let [i0, i1, i2, i3, t0, t1, t2, t3] = *fixed(body, pos)?;
            (
                Element::Timestamp {
                    increment: u32::from_le_bytes([i0, i1, i2, i3]),
                    time: u32::from_le_bytes([t0, t1, t2, t3]),
                },
                pos + 8,
            )
        }
        0x12 => (
            Element::Int64(i64::from_le_bytes(*fixed(body, pos)?)),
            pos + 8,
        ),
        0x13 => (Element::Decimal128(fixed(body, pos)?), pos + 16),
        0xff => (Element::MinKey, pos),
        0x7f => (Element::MaxKey, pos),
        _ => return Err("unknown element type"),
    })
}

/// The error for element `key` of a document.
#[cold]
#[inline(never)]
pub(crate) fn bad_element(key: &[u8], what: &str) -> Error {
    Error::Malformed(format!("field {:?}: {what}", String::from_utf8_lossy(key)))
}

#[cold]
#[inline(never)]
pub(crate) fn bad_document(what: &str) -> Error {
    Error::Malformed(what.to_owned())
}

/// The start of an element: type byte and key.
pub(crate) struct Header<'a> {
    pub(crate) tag: u8,
    pub(crate) key: &'a [u8],
    /// Where the value starts.
    pub(crate) value_at: usize,
    /// For a key shorter than 8 bytes: its bytes as the low lanes of a little-endian word,
    /// the other lanes zero.
    pub(crate) short_key: Option<u64>,
}

/// Read the element header at `pos` (which must be `< body.len()`).
#[inline(always)]
pub(crate) fn element_header(body: &[u8], pos: usize) -> Result<Header<'_>, Error> {
    let tag = body[pos];
    let key_at = pos + 1;
    let rest = body.get(key_at..).unwrap_or_default();
    // Most keys are short, and the element's value follows the key, so usually one 8-byte
    // load finds the NUL and already holds the whole key.
    if let Some(chunk) = rest.get(..8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let zero = w.wrapping_sub(LO) & !w & HI;
        if zero != 0 {
            let len = (zero.trailing_zeros() / 8) as usize;
            return Ok(Header {
                tag,
                key: &rest[..len],
                value_at: key_at + len + 1,
                // `len < 8`, so the shift is in range.
                short_key: Some(w & ((1 << (8 * len)) - 1)),
            });
        }
    }
    match find_nul(rest) {
        Some(len) => Ok(Header {
            tag,
            key: &rest[..len],
            value_at: key_at + len + 1,
            short_key: None,
        }),
        None => Err(bad_document("element key without a terminating NUL")),
    }
}

/// Write `"key":`. A short key that is plain ASCII with nothing to escape (the usual case) is
/// stored in one go.
#[inline(always)]
pub(crate) fn write_key(key: &[u8], short_key: Option<u64>, out: &mut Vec<u8>) -> Result<(), Error> {
    if let Some(w) = short_key {
        let n = key.len();
        // Spaces in the lanes above the key: they need no escaping.
        let padded = w | (LO * 0x20) << (8 * n);
        if (escape_lanes(padded) | (w & HI)) == 0 {
            let quoted = u128::from(b'"')
                | u128::from(w) << 8
                | u128::from(u16::from_le_bytes(*b"\":")) << (8 * (n + 1));
            let len = out.len() + n + 3;
            out.extend_from_slice(&quoted.to_le_bytes());
            out.truncate(len);
            return Ok(());
        }
    }
    write_utf8_str(key, out)?;
    out.push(b':');
    Ok(())
}

/// Position of the first NUL byte, looked for eight bytes at a time.
#[inline(always)]
fn find_nul(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        // High bit set in the lane of each zero byte; the lowest one is exact.
        let zero = w.wrapping_sub(LO) & !w & HI;
        if zero != 0 {
            return Some(i + (zero.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let rest = bytes.get(i..)?;
    rest.iter().position(|&b| b == 0).map(|p| i + p)
}

/// `doc` is a whole document: length prefix, elements, NUL.
fn write_doc_at(
    doc: &[u8],
    skip_id: bool,
    depth: usize,
    out: &mut Vec<u8>,
    stats: &mut ConvertStats,
) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    let body = document_body(doc).map_err(bad_document)?;
    out.push(b'{');
    let mut pos = 0;
    let mut first = true;
    while pos < body.len() {
        let h = element_header(body, pos)?;
        let (value, next) =
            read_element(h.tag, body, h.value_at).map_err(|e| bad_element(h.key, e))?;
        pos = next;
        // A skipped `_id` is checked like every other element, but not written.
        if skip_id && h.key == b"_id" {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_key(h.key, h.short_key, out)?;
        write_element(value, depth, out, stats)?;
    }
    out.push(b'}');
    Ok(())
}

/// `array` is a whole array document. Its keys ("0", "1", …) are checked but not written.
fn write_array_at(
    array: &[u8],
    depth: usize,
    out: &mut Vec<u8>,
    stats: &mut ConvertStats,
) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    let body = document_body(array).map_err(bad_document)?;
    out.push(b'[');
    let mut pos = 0;
    while pos < body.len() {
        let h = element_header(body, pos)?;
        // The key is not written, but like any key it must be UTF-8. Index keys are short
        // ASCII, which the word that found the NUL already shows.
        if h.short_key.is_none_or(|w| w & HI != 0) {
            check_utf8(h.key)?;
        }
        let (value, next) =
            read_element(h.tag, body, h.value_at).map_err(|e| bad_element(h.key, e))?;
        if pos > 0 {
            out.push(b',');
        }
        pos = next;
        write_element(value, depth, out, stats)?;
    }
    out.push(b']');
    Ok(())
}

/// `depth` is the nesting level of the container holding `value`.
#[inline(always)]
pub(crate) fn write_element(
    value: Element<'_>,
    depth: usize,
    out: &mut Vec<u8>,
    stats: &mut ConvertStats,
) -> Result<(), Error> {
    match value {
        Element::Double(f) => write_double(f, out, stats),
        Element::Str(s) => write_utf8_str(s, out)?,
        Element::Document(d) => write_doc_at(d, false, depth + 1, out, stats)?,
        Element::Array(a) => write_array_at(a, depth + 1, out, stats)?,
        Element::Binary(subtype, bytes) => write_binary(subtype, bytes, out),
        Element::Null => out.extend_from_slice(b"null"),
        Element::ObjectId(oid) => write_oid_quoted(oid, out),
        Element::Boolean(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        Element::DateTime(millis) => write_datetime(millis, out),
        Element::Regex(pattern, options) => {
            out.push(b'"');
            write_escaped(b"/", out);
            let non_ascii = write_escaped(pattern, out) | write_escaped(b"/", out);
            let non_ascii = non_ascii | write_escaped(options, out);
            if non_ascii {
                check_utf8(pattern)?;
                check_utf8(options)?;
            }
            out.push(b'"');
        }
        Element::DbPointer(namespace, oid) => {
            check_utf8(namespace)?;
            write_db_pointer(namespace, oid, out);
        }
        Element::Int32(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
        Element::Timestamp { time, increment } => write_timestamp(time, increment, out),
        Element::Int64(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
        Element::Decimal128(bytes) => write_decimal128(Decimal128::from_bytes(*bytes), out),
        Element::MinKey => out.extend_from_slice(b"{\"$minKey\":1}"),
        Element::MaxKey => out.extend_from_slice(b"{\"$maxKey\":1}"),
    }
    Ok(())
}

/// Write a single [`RawBsonRef`] (the entry point for values that bson has already split out).
/// Containers are handed to the byte walker.
fn write_value_at(
    value: RawBsonRef<'_>,
    depth: usize,
    out: &mut Vec<u8>,
    stats: &mut ConvertStats,
) -> Result<(), Error> {
    match value {
        RawBsonRef::Double(f) => write_double(f, out, stats),
        RawBsonRef::String(s) => write_str(s, out),
        RawBsonRef::Document(d) => write_doc_at(d.as_bytes(), false, depth + 1, out, stats)?,
        RawBsonRef::Array(a) => write_array_at(a.as_bytes(), depth + 1, out, stats)?,
        RawBsonRef::Boolean(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        RawBsonRef::Null | RawBsonRef::Undefined => out.extend_from_slice(b"null"),
        RawBsonRef::Int32(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
        RawBsonRef::Int64(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
        RawBsonRef::ObjectId(oid) => write_oid_quoted(&oid.bytes(), out),
        RawBsonRef::DateTime(dt) => write_datetime(dt.timestamp_millis(), out),
        RawBsonRef::Binary(bin) => write_binary(u8::from(bin.subtype), bin.bytes, out),
        RawBsonRef::Timestamp(ts) => write_timestamp(ts.time, ts.increment, out),
        RawBsonRef::RegularExpression(re) => {
            out.push(b'"');
            write_escaped(b"/", out);
            write_escaped(re.pattern.as_bytes(), out);
            write_escaped(b"/", out);
            write_escaped(re.options.as_bytes(), out);
            out.push(b'"');
        }
        RawBsonRef::JavaScriptCode(code) => write_str(code, out),
        RawBsonRef::JavaScriptCodeWithScope(cws) => write_str(cws.code, out),
        RawBsonRef::Symbol(s) => write_str(s, out),
        RawBsonRef::Decimal128(d) => write_decimal128(d, out),
        RawBsonRef::MinKey => out.extend_from_slice(b"{\"$minKey\":1}"),
        RawBsonRef::MaxKey => out.extend_from_slice(b"{\"$maxKey\":1}"),
        RawBsonRef::DbPointer(p) => {
            let (namespace, oid) = db_pointer_parts(p)?;
            write_db_pointer(namespace.as_bytes(), &oid.bytes(), out);
        }
    }
    Ok(())
}

#[inline]
fn write_double(f: f64, out: &mut Vec<u8>, stats: &mut ConvertStats) {
    if f.is_finite() {
        out.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
    } else {
        stats.non_finite_nulled += 1;
        out.extend_from_slice(b"null");
    }
}

fn write_timestamp(time: u32, increment: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"t\":");
    out.extend_from_slice(itoa::Buffer::new().format(time).as_bytes());
    out.extend_from_slice(b",\"i\":");
    out.extend_from_slice(itoa::Buffer::new().format(increment).as_bytes());
    out.push(b'}');
}

fn write_decimal128(d: Decimal128, out: &mut Vec<u8>) {
    out.push(b'"');
    // The canonical text holds only digits, '.', 'E', '+', '-', "NaN" and "Infinity", so it
    // needs no escaping. Writing into a Vec<u8> cannot fail.
    let _ = write!(out, "{d}");
    out.push(b'"');
}

/// `namespace` must be valid UTF-8.
fn write_db_pointer(namespace: &[u8], oid: &[u8; 12], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"$ref\":\"");
    write_escaped(namespace, out);
    out.extend_from_slice(b"\",\"$id\":");
    write_oid_quoted(oid, out);
    out.push(b'}');
}

/// bson 2.15 keeps `RawDbPointerRef`'s fields `pub(crate)` and offers no accessors. Its serde
/// `Serialize` impl is the only public way to get at them, and it produces
/// `{"$dbPointer":{"$ref":ns,"$id":{"$oid":hex}}}`. DbPointer has been deprecated since
/// MongoDB 1.x, so going through a small `Value` here costs nothing in practice.
fn db_pointer_parts(p: RawDbPointerRef<'_>) -> Result<(String, ObjectId), Error> {
    let v = serde_json::to_value(p).map_err(malformed)?;
    let body = &v["$dbPointer"];
    let namespace = body["$ref"]
        .as_str()
        .ok_or_else(|| Error::Malformed("DbPointer without a namespace".into()))?;
    let hex = body["$id"]["$oid"]
        .as_str()
        .ok_or_else(|| Error::Malformed("DbPointer without an ObjectId".into()))?;
    let oid = ObjectId::parse_str(hex).map_err(malformed)?;
    Ok((namespace.to_owned(), oid))
}

// ---------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------

const HEX: &[u8; 16] = b"0123456789abcdef";

fn write_oid_quoted(oid: &[u8; 12], out: &mut Vec<u8>) {
    let mut buf = [b'"'; 26];
    hex_into(oid, &mut buf[1..25]);
    out.extend_from_slice(&buf);
}

/// Lower-case hex of `bytes` into `dst`, which must be exactly twice as long.
fn hex_into(bytes: &[u8], dst: &mut [u8]) {
    for (pair, &b) in dst.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
}

/// `subtype` is the BSON binary subtype byte; 4 is UUID and 3 legacy UUID.
fn write_binary(subtype: u8, bytes: &[u8], out: &mut Vec<u8>) {
    match subtype {
        3 | 4 if bytes.len() == 16 => {
            // "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" with quotes: 36 + 2 bytes.
            let mut buf = [b'"'; 38];
            let b = bytes;
            hex_into(&b[0..4], &mut buf[1..9]);
            buf[9] = b'-';
            hex_into(&b[4..6], &mut buf[10..14]);
            buf[14] = b'-';
            hex_into(&b[6..8], &mut buf[15..19]);
            buf[19] = b'-';
            hex_into(&b[8..10], &mut buf[20..24]);
            buf[24] = b'-';
            hex_into(&b[10..16], &mut buf[25..37]);
            out.extend_from_slice(&buf);
        }
        _ => {
            out.push(b'"');
            write_base64(bytes, out);
            out.push(b'"');
        }
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648 §4) with `=` padding.
fn write_base64(bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(bytes.len().div_ceil(3) * 4);
    let mut chunks = bytes.chunks_exact(3);
    for c in &mut chunks {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        out.extend_from_slice(&[
            BASE64[(n >> 18) as usize & 63],
            BASE64[(n >> 12) as usize & 63],
            BASE64[(n >> 6) as usize & 63],
            BASE64[n as usize & 63],
        ]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[
                BASE64[(n >> 18) as usize & 63],
                BASE64[(n >> 12) as usize & 63],
                b'=',
                b'=',
            ]);
        }
        [a, b] => {
            let n = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.extend_from_slice(&[
                BASE64[(n >> 18) as usize & 63],
                BASE64[(n >> 12) as usize & 63],
                BASE64[(n >> 6) as usize & 63],
                b'=',
            ]);
        }
        _ => {}
    }
}

const MILLIS_PER_DAY: i64 = 86_400_000;

/// Proleptic Gregorian (year, month, day) for a count of days since 1970-01-01.
///
/// This follows the era-based method published by Howard Hinnant ("chrono-compatible low-level
/// date algorithms", public domain). The count is shifted so that eras of 400 years start on
/// March 1st, which puts the leap day at the end of the computed year. All arithmetic is
/// `i64`, so the whole `DateTime` range (±292 million years) is safe from overflow.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // 719_468 days separate 0000-03-01 (the start of era 0) from 1970-01-01.
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097); // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11], 0 = March
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32; // [1, 31]
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32; // [1, 12]
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn put_digits(dst: &mut [u8], mut v: u32) {
    for slot in dst.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// `"YYYY-MM-DDTHH:MM:SS.mmmZ"` for years 0..=9999, else the epoch-millis as a JSON number.
fn write_datetime(millis: i64, out: &mut Vec<u8>) {
    match iso_datetime(millis, 0..=9999) {
        Some(buf) => {
            out.push(b'"');
            out.extend_from_slice(&buf);
            out.push(b'"');
        }
        None => out.extend_from_slice(itoa::Buffer::new().format(millis).as_bytes()),
    }
}

/// The 24 bytes `YYYY-MM-DDTHH:MM:SS.mmmZ`, or `None` when the year is outside `years`.
pub(crate) fn iso_datetime(millis: i64, years: std::ops::RangeInclusive<i64>) -> Option<[u8; 24]> {
    let days = millis.div_euclid(MILLIS_PER_DAY);
    let ms_of_day = millis.rem_euclid(MILLIS_PER_DAY) as u32;
    let (year, month, day) = civil_from_days(days);
    // The second check guards the four-digit buffer whatever range the caller passes.
    if !years.contains(&year) || !(0..=9999).contains(&year) {
        return None;
    }
    let mut buf = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut buf[0..4], year as u32);
    put_digits(&mut buf[5..7], month);
    put_digits(&mut buf[8..10], day);
    put_digits(&mut buf[11..13], ms_of_day / 3_600_000);
    put_digits(&mut buf[14..16], ms_of_day / 60_000 % 60);
    put_digits(&mut buf[17..19], ms_of_day / 1_000 % 60);
    put_digits(&mut buf[20..23], ms_of_day % 1_000);
    Some(buf)
}

// ---------------------------------------------------------------------------------------------
// String escaping
// ---------------------------------------------------------------------------------------------

/// For each byte: 0 if it is copied as-is, `b'u'` if it becomes `\u00XX`, otherwise the
/// character that follows the backslash.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = b'u';
        i += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Write `s` as a quoted JSON string: the one JSON string writer of the engine (documents,
/// bulk action lines, location records, ids).
#[inline]
pub fn write_json_str(s: &str, out: &mut Vec<u8>) {
    write_str(s, out);
}

/// Write `s` as a quoted JSON string.
#[inline]
fn write_str(s: &str, out: &mut Vec<u8>) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    write_escaped(s.as_bytes(), out);
    out.push(b'"');
}

/// Write raw string bytes from a document as a quoted JSON string, or fail if they are not
/// UTF-8. Text that is all ASCII (seen by the escape scan) skips the `from_utf8` pass.
#[inline]
fn write_utf8_str(bytes: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if write_escaped(bytes, out) {
        check_utf8(bytes)?;
    }
    out.push(b'"');
    Ok(())
}

#[inline]
fn check_utf8(bytes: &[u8]) -> Result<(), Error> {
    match std::str::from_utf8(bytes) {
        Ok(_) => Ok(()),
        Err(e) => Err(invalid_utf8(e)),
    }
}

#[cold]
#[inline(never)]
fn invalid_utf8(e: std::str::Utf8Error) -> Error {
    Error::Malformed(format!("invalid UTF-8 in a key or string: {e}"))
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// High bit set in each byte lane of `w` that needs escaping (`< 0x20`, `"` or `\`). The lowest
/// flagged lane is always exact. Borrows only propagate upward, so a lane above a real hit may
/// be flagged falsely, which is harmless because we act only on the lowest lane.
#[inline]
fn escape_lanes(w: u64) -> u64 {
    let control = w.wrapping_sub(LO * 0x20);
    let quote = w ^ (LO * u64::from(b'"'));
    let backslash = w ^ (LO * u64::from(b'\\'));
    ((control & !w) | (quote.wrapping_sub(LO) & !quote) | (backslash.wrapping_sub(LO) & !backslash))
        & HI
}

/// Append the JSON-escaped body (no quotes) of `bytes`. Only ASCII bytes are escaped, so
/// multi-byte UTF-8 sequences (all bytes ≥ 0x80) pass through intact. Returns whether any
/// byte is ≥ 0x80, i.e. whether the text needs a UTF-8 check (it is ASCII otherwise).
fn write_escaped(bytes: &[u8], out: &mut Vec<u8>) -> bool {
    let mut i = 0;
    // OR of every word looked at; every byte is in at least one.
    let mut seen = 0;
    // Eight bytes at a time: most text has no escapes at all. The last < 8 bytes are padded
    // with spaces, which never need escaping. Clean bytes are appended as a whole word and the
    // excess cut off again: a fixed-size store is much cheaper than a `memcpy` call for the
    // short runs that keys and typical field values are made of.
    while i < bytes.len() {
        let (w, n) = match bytes.get(i..i + 8) {
            Some(chunk) => {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                (u64::from_le_bytes(word), 8)
            }
            None => {
                let rest = bytes.get(i..).unwrap_or_default();
                (tail_word(rest), rest.len())
            }
        };
        seen |= w;
        let lanes = escape_lanes(w);
        // The lowest flagged lane is exact, and padding lanes are never flagged below it.
        let clean = ((lanes.trailing_zeros() / 8) as usize).min(n);
        push_word_prefix(w, clean, out);
        if clean == n {
            i += n;
            continue;
        }
        let b = (w >> (8 * clean)) as u8;
        if ESCAPE[usize::from(b)] != 0 {
            write_escape(b, out);
        } else {
            out.push(b);
        }
        i += clean + 1;
    }
    seen & HI != 0
}

/// Append the low `n` (≤ 8) byte lanes of `w`.
#[inline(always)]
fn push_word_prefix(w: u64, n: usize, out: &mut Vec<u8>) {
    let len = out.len() + n;
    out.extend_from_slice(&w.to_le_bytes());
    out.truncate(len);
}

/// The 1 to 7 bytes of `rest` as the low lanes of a little-endian word, the other lanes filled
/// with spaces (which need no escaping). Built from two overlapping loads rather than a copy
/// into a stack buffer, because reading a word back right after a variable-length byte copy
/// stalls the CPU's store forwarding.
#[inline]
fn tail_word(rest: &[u8]) -> u64 {
    const SPACES: u64 = LO * 0x20;
    let n = rest.len();
    let data = match *rest {
        [] => 0,
        [a] => u64::from(a),
        [a, b] => u64::from(u16::from_le_bytes([a, b])),
        [a, b, c] => u64::from(u16::from_le_bytes([a, b])) | u64::from(c) << 16,
        [a, b, c, d, ..] if n < 8 => {
            let [w, x, y, z] = rest
                .get(n - 4..)
                .and_then(|s| s.try_into().ok())
                .unwrap_or([0; 4]);
            u64::from(u32::from_le_bytes([a, b, c, d]))
                | u64::from(u32::from_le_bytes([w, x, y, z])) << (8 * (n - 4))
        }
        _ => return 0,
    };
    data | SPACES.checked_shl(8 * n as u32).unwrap_or(0)
}

#[cold]
fn write_escape(b: u8, out: &mut Vec<u8>) {
    match ESCAPE[usize::from(b)] {
        b'u' => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 0x0f)],
        ]),
        c => out.extend_from_slice(&[b'\\', c]),
    }
}

// ---------------------------------------------------------------------------------------------
// Elasticsearch _id
// ---------------------------------------------------------------------------------------------

/// The Elasticsearch `_id` for a MongoDB `_id` value, appended to `out` as a JSON *string*
/// (with quotes, escaped). See the module docs for the mapping.
///
/// Returns [`Error::IdTooLong`] (leaving `out` untouched) if the id would be longer than
/// [`MAX_ES_ID_BYTES`] bytes of UTF-8.
pub fn write_es_id(id: RawBsonRef<'_>, out: &mut Vec<u8>) -> Result<(), Error> {
    match id {
        // The common id types, written without a temporary buffer. None of them can exceed
        // the limit, except a long string.
        RawBsonRef::ObjectId(oid) => write_oid_quoted(&oid.bytes(), out),
        RawBsonRef::String(s) => {
            check_id_len(s.len())?;
            write_str(s, out);
        }
        RawBsonRef::Int32(i) => write_quoted_ascii(itoa::Buffer::new().format(i), out),
        RawBsonRef::Int64(i) => write_quoted_ascii(itoa::Buffer::new().format(i), out),
        other => {
            let mut text = Vec::with_capacity(64);
            write_id_text(other, &mut text)?;
            out.push(b'"');
            write_escaped(&text, out);
            out.push(b'"');
        }
    }
    Ok(())
}

/// [`write_es_id`] as an owned JSON literal, allocated once at its size: the id is written
/// into a scratch buffer of the thread first (every plain write needs one).
pub fn es_id_json(id: RawBsonRef<'_>) -> Result<Box<str>, Error> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(64));
    }
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        write_es_id(id, buf)?;
        // The writer only writes valid UTF-8; `from_utf8_lossy` only guards the type.
        Ok(String::from_utf8_lossy(buf).into())
    })
}

/// Same as [`write_es_id`], but returns the id as an owned, unquoted, unescaped `String`.
pub fn es_id_string(id: RawBsonRef<'_>) -> Result<String, Error> {
    match id {
        RawBsonRef::String(s) => {
            check_id_len(s.len())?;
            Ok(s.to_owned())
        }
        RawBsonRef::ObjectId(oid) => Ok(oid.to_hex()),
        other => {
            let mut text = Vec::with_capacity(32);
            write_id_text(other, &mut text)?;
            // Every piece of the text is either a `&str` from the document or ASCII we wrote.
            String::from_utf8(text).map_err(malformed)
        }
    }
}

fn check_id_len(len: usize) -> Result<(), Error> {
    if len > MAX_ES_ID_BYTES {
        Err(Error::IdTooLong(len))
    } else {
        Ok(())
    }
}

fn write_quoted_ascii(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// The unquoted, unescaped id text into `text`, with the length checked.
fn write_id_text(id: RawBsonRef<'_>, text: &mut Vec<u8>) -> Result<(), Error> {
    match id {
        RawBsonRef::String(s) => text.extend_from_slice(s.as_bytes()),
        RawBsonRef::ObjectId(oid) => {
            let mut buf = [0u8; 24];
            hex_into(&oid.bytes(), &mut buf);
            text.extend_from_slice(&buf);
        }
        RawBsonRef::Int32(i) => text.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
        RawBsonRef::Int64(i) => text.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
        RawBsonRef::Double(f) => write_id_double(f, text),
        RawBsonRef::Decimal128(d) => {
            let _ = write!(text, "{d}");
        }
        other => write_extjson_at(other, 0, text)?,
    }
    check_id_len(text.len())
}

/// Doubles that hold an integer in the `i64` range print like that integer. MongoDB compares
/// numbers by value across types, so `_id: 5` and `_id: 5.0` are the same document.
fn write_id_double(f: f64, out: &mut Vec<u8>) {
    // 2^63 as f64, exactly. Every f64 in [-2^63, 2^63) converts to i64 exactly.
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if f.is_nan() {
        out.extend_from_slice(b"NaN");
    } else if f.is_infinite() {
        out.extend_from_slice(if f > 0.0 {
            b"Infinity" as &[u8]
        } else {
            b"-Infinity"
        });
    } else if f.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(&f) {
        out.extend_from_slice(itoa::Buffer::new().format(f as i64).as_bytes());
    } else {
        out.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
    }
}

/// Canonical relaxed Extended JSON v2 for the less common id types. We write it ourselves
/// instead of using `Bson::into_relaxed_extjson`, because that builds a `serde_json::Value`,
/// whose object key order depends on whether some crate in the build turned on serde_json's
/// `preserve_order`. Ids must never change with the build, and `{a:1,b:2}` and `{b:2,a:1}`
/// are different `_id`s in MongoDB.
fn write_extjson_at(value: RawBsonRef<'_>, depth: usize, out: &mut Vec<u8>) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    match value {
        RawBsonRef::Double(f) => {
            if f.is_finite() {
                out.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
            } else {
                out.extend_from_slice(b"{\"$numberDouble\":\"");
                write_id_double(f, out);
                out.extend_from_slice(b"\"}");
            }
        }
        RawBsonRef::String(s) => write_str(s, out),
        RawBsonRef::Document(d) => {
            out.push(b'{');
            for (n, element) in d.iter().enumerate() {
                let (key, v) = element.map_err(malformed)?;
                if n > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                write_extjson_at(v, depth + 1, out)?;
            }
            out.push(b'}');
        }
        RawBsonRef::Array(a) => {
            out.push(b'[');
            for (n, v) in a.into_iter().enumerate() {
                let v = v.map_err(malformed)?;
                if n > 0 {
                    out.push(b',');
                }
                write_extjson_at(v, depth + 1, out)?;
            }
            out.push(b']');
        }
        RawBsonRef::Boolean(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        RawBsonRef::Null => out.extend_from_slice(b"null"),
        RawBsonRef::Undefined => out.extend_from_slice(b"{\"$undefined\":true}"),
        RawBsonRef::Int32(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
        RawBsonRef::Int64(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
        RawBsonRef::ObjectId(oid) => {
            out.extend_from_slice(b"{\"$oid\":");
            write_oid_quoted(&oid.bytes(), out);
            out.push(b'}');
        }
        RawBsonRef::DateTime(dt) => {
            let millis = dt.timestamp_millis();
            out.extend_from_slice(b"{\"$date\":");
            // The relaxed form uses an ISO string only for years 1970..=9999.
            match iso_datetime(millis, 1970..=9999) {
                Some(buf) => {
                    out.push(b'"');
                    out.extend_from_slice(&buf);
                    out.push(b'"');
                }
                None => {
                    out.extend_from_slice(b"{\"$numberLong\":");
                    write_quoted_ascii(itoa::Buffer::new().format(millis), out);
                    out.push(b'}');
                }
            }
            out.push(b'}');
        }
        RawBsonRef::Binary(bin) => {
            out.extend_from_slice(b"{\"$binary\":{\"base64\":\"");
            write_base64(bin.bytes, out);
            out.extend_from_slice(b"\",\"subType\":\"");
            let mut sub = [0u8; 2];
            hex_into(&[u8::from(bin.subtype)], &mut sub);
            out.extend_from_slice(&sub);
            out.extend_from_slice(b"\"}}");
        }
        RawBsonRef::Timestamp(ts) => {
            out.extend_from_slice(b"{\"$timestamp\":{\"t\":");
            out.extend_from_slice(itoa::Buffer::new().format(ts.time).as_bytes());
            out.extend_from_slice(b",\"i\":");
            out.extend_from_slice(itoa::Buffer::new().format(ts.increment).as_bytes());
            out.extend_from_slice(b"}}");
        }
        RawBsonRef::RegularExpression(re) => {
            // The spec wants the options in alphabetical order.
            let mut options: Vec<char> = re.options.chars().collect();
            options.sort_unstable();
            let options: String = options.into_iter().collect();
            out.extend_from_slice(b"{\"$regularExpression\":{\"pattern\":");
            write_str(re.pattern, out);
            out.extend_from_slice(b",\"options\":");
            write_str(&options, out);
            out.extend_from_slice(b"}}");
        }
        RawBsonRef::JavaScriptCode(code) => {
            out.extend_from_slice(b"{\"$code\":");
            write_str(code, out);
            out.push(b'}');
        }
        RawBsonRef::JavaScriptCodeWithScope(cws) => {
            out.extend_from_slice(b"{\"$code\":");
            write_str(cws.code, out);
            out.extend_from_slice(b",\"$scope\":");
            write_extjson_at(RawBsonRef::Document(cws.scope), depth + 1, out)?;
            out.push(b'}');
        }
        RawBsonRef::Symbol(s) => {
            out.extend_from_slice(b"{\"$symbol\":");
            write_str(s, out);
            out.push(b'}');
        }
        RawBsonRef::Decimal128(d) => {
            out.extend_from_slice(b"{\"$numberDecimal\":\"");
            let _ = write!(out, "{d}");
            out.extend_from_slice(b"\"}");
        }
        RawBsonRef::MinKey => out.extend_from_slice(b"{\"$minKey\":1}"),
        RawBsonRef::MaxKey => out.extend_from_slice(b"{\"$maxKey\":1}"),
        RawBsonRef::DbPointer(p) => {
            let (namespace, oid) = db_pointer_parts(p)?;
            out.extend_from_slice(b"{\"$dbPointer\":{\"$ref\":");
            write_str(&namespace, out);
            out.extend_from_slice(b",\"$id\":{\"$oid\":");
            write_oid_quoted(&oid.bytes(), out);
            out.extend_from_slice(b"}}}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{
        doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, DateTime, Decimal128, Document,
        JavaScriptCodeWithScope, RawDocumentBuf, Regex, Timestamp,
    };
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn raw(d: &Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(d).expect("serializable document")
    }

    fn convert(d: &Document, skip_id: bool) -> (String, ConvertStats) {
        let raw = raw(d);
        let mut out = Vec::new();
        let mut stats = ConvertStats::default();
        write_document(&raw, skip_id, &mut out, &mut stats).expect("conversion succeeds");
        (String::from_utf8(out).expect("utf-8 output"), stats)
    }

    fn json_of(d: &Document) -> String {
        convert(d, false).0
    }

    /// JSON for `{"v": value}` with the wrapper stripped: the text of one value.
    fn value_json(v: impl Into<Bson>) -> String {
        let s = json_of(&doc! { "v": v.into() });
        s.strip_prefix("{\"v\":")
            .and_then(|s| s.strip_suffix('}'))
            .expect("wrapped value")
            .to_owned()
    }

    fn value_json_raw(v: RawBsonRef<'_>) -> String {
        let mut out = Vec::new();
        let mut stats = ConvertStats::default();
        write_value(v, &mut out, &mut stats).expect("conversion succeeds");
        String::from_utf8(out).expect("utf-8 output")
    }

    /// Builds raw document bytes from (element type, key, encoded value) triples, for types
    /// and malformations that the `doc!` builder cannot express.
    fn handmade(elements: &[(u8, &str, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (tag, key, value) in elements {
            body.push(*tag);
            body.extend_from_slice(key.as_bytes());
            body.push(0);
            body.extend_from_slice(value);
        }
        let len = (body.len() + 5) as i32;
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        bytes.push(0);
        bytes
    }

    fn bson_string(s: &[u8]) -> Vec<u8> {
        let mut v = ((s.len() + 1) as i32).to_le_bytes().to_vec();
        v.extend_from_slice(s);
        v.push(0);
        v
    }

    fn dt(y: i32, mo: u8, d: u8, h: u8, mi: u8, s: u8, ms: u16) -> DateTime {
        DateTime::builder()
            .year(y)
            .month(mo)
            .day(d)
            .hour(h)
            .minute(mi)
            .second(s)
            .millisecond(ms)
            .build()
            .expect("valid date")
    }

    fn es_id(v: impl Into<Bson>) -> String {
        let d = raw(&doc! { "_id": v.into() });
        let id = d.get("_id").expect("valid").expect("present");
        let mut out = Vec::new();
        write_es_id(id, &mut out).expect("id fits");
        let quoted = String::from_utf8(out).expect("utf-8");
        let unquoted = es_id_string(id).expect("id fits");
        // The two entry points must agree: the quoted form is the JSON encoding of the other.
        assert_eq!(quoted, serde_json::to_string(&unquoted).expect("json"));
        unquoted
    }

    // ----- scalar types -----

    #[test]
    fn doubles() {
        assert_eq!(value_json(1.5), "1.5");
        assert_eq!(value_json(3.0), "3.0");
        assert_eq!(value_json(-0.0), "-0.0");
        assert_eq!(value_json(1e300), "1e300");
        assert_eq!(value_json(-2.5e-10), "-2.5e-10");
        assert_eq!(value_json(0.1), "0.1");
    }

    #[test]
    fn non_finite_doubles_become_null_and_are_counted() {
        let d = doc! { "a": f64::NAN, "b": f64::INFINITY, "c": [f64::NEG_INFINITY, 1.0], "d": 2.0 };
        let (json, stats) = convert(&d, false);
        assert_eq!(json, r#"{"a":null,"b":null,"c":[null,1.0],"d":2.0}"#);
        assert_eq!(stats.non_finite_nulled, 3);
        // Counters accumulate across calls.
        let mut out = Vec::new();
        let mut stats = ConvertStats {
            non_finite_nulled: 10,
        };
        write_document(&raw(&d), false, &mut out, &mut stats).expect("ok");
        assert_eq!(stats.non_finite_nulled, 13);
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(value_json("plain"), r#""plain""#);
        assert_eq!(value_json(""), r#""""#);
        assert_eq!(value_json("a\"b\\c"), r#""a\"b\\c""#);
        // DEL (0x7f) is not a control character in JSON's sense and is copied as-is.
        assert_eq!(
            value_json("\n\t\r\u{8}\u{c}\u{0}\u{1f}\u{7f}"),
            "\"\\n\\t\\r\\b\\f\\u0000\\u001f\u{7f}\""
        );
        assert_eq!(value_json("héllo ☃ 😀 \u{2028}"), "\"héllo ☃ 😀 \u{2028}\"");
        // Escapes at every position relative to the 8-byte fast path.
        for pad in 0..20 {
            let s = format!("{}\"{}\n", "x".repeat(pad), "y".repeat(pad));
            let expected = format!("\"{}\\\"{}\\n\"", "x".repeat(pad), "y".repeat(pad));
            assert_eq!(value_json(s.as_str()), expected);
        }
    }

    #[test]
    fn keys_are_escaped() {
        assert_eq!(json_of(&doc! { "a\"b\n": 1 }), r#"{"a\"b\n":1}"#);
    }

    #[test]
    fn integers() {
        assert_eq!(value_json(0), "0");
        assert_eq!(value_json(i32::MIN), "-2147483648");
        assert_eq!(value_json(i32::MAX), "2147483647");
        assert_eq!(value_json(i64::MIN), "-9223372036854775808");
        assert_eq!(value_json(i64::MAX), "9223372036854775807");
        assert_eq!(value_json(9_007_199_254_740_993_i64), "9007199254740993");
    }

    #[test]
    fn booleans_null_undefined_minmax() {
        assert_eq!(value_json(true), "true");
        assert_eq!(value_json(false), "false");
        assert_eq!(value_json(Bson::Null), "null");
        assert_eq!(value_json(Bson::Undefined), "null");
        assert_eq!(value_json(Bson::MinKey), r#"{"$minKey":1}"#);
        assert_eq!(value_json(Bson::MaxKey), r#"{"$maxKey":1}"#);
    }

    #[test]
    fn object_id() {
        let oid = ObjectId::parse_str("5F1D7A3B9C0E4B2A1C3D4E5F").expect("hex");
        assert_eq!(value_json(oid), r#""5f1d7a3b9c0e4b2a1c3d4e5f""#);
    }

    #[test]
    fn binary() {
        let uuid = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        let bin = |subtype, bytes: &[u8]| Binary {
            subtype,
            bytes: bytes.to_vec(),
        };
        assert_eq!(
            value_json(bin(BinarySubtype::Uuid, &uuid)),
            r#""12345678-9abc-def0-0123-456789abcdef""#
        );
        assert_eq!(
            value_json(bin(BinarySubtype::UuidOld, &uuid)),
            r#""12345678-9abc-def0-0123-456789abcdef""#
        );
        // A "UUID" of the wrong length is just bytes.
        assert_eq!(value_json(bin(BinarySubtype::Uuid, b"abc")), r#""YWJj""#);
        assert_eq!(value_json(bin(BinarySubtype::Generic, b"")), r#""""#);
        assert_eq!(value_json(bin(BinarySubtype::Generic, b"f")), r#""Zg==""#);
        assert_eq!(value_json(bin(BinarySubtype::Generic, b"fo")), r#""Zm8=""#);
        assert_eq!(value_json(bin(BinarySubtype::Generic, b"foo")), r#""Zm9v""#);
        assert_eq!(
            value_json(bin(BinarySubtype::Md5, b"foobar")),
            r#""Zm9vYmFy""#
        );
        assert_eq!(
            value_json(bin(
                BinarySubtype::UserDefined(0x80),
                &[0xff, 0xfe, 0x00, 0x3e]
            )),
            r#""//4APg==""#
        );
        // Old binary subtype 2: the inner length prefix is not part of the data.
        let mut old = 7_i32.to_le_bytes().to_vec();
        old.push(2);
        old.extend_from_slice(&3_i32.to_le_bytes());
        old.extend_from_slice(b"foo");
        let bytes = handmade(&[(0x05, "v", old)]);
        let d = RawDocument::from_bytes(&bytes).expect("valid");
        let mut out = Vec::new();
        write_document(d, false, &mut out, &mut ConvertStats::default()).expect("ok");
        assert_eq!(out, br#"{"v":"Zm9v"}"#);
    }

    #[test]
    fn base64_matches_reference_for_all_lengths() {
        let data: Vec<u8> = (0..=255u8).collect();
        for n in 0..40 {
            let b = Bson::Binary(Binary {
                subtype: BinarySubtype::Generic,
                bytes: data[..n].to_vec(),
            });
            // Relaxed extended JSON carries bson's own base64 encoder: an independent reference.
            let reference = b.clone().into_relaxed_extjson()["$binary"]["base64"].clone();
            assert_eq!(
                value_json(b),
                serde_json::to_string(&reference).expect("json")
            );
        }
    }

    #[test]
    fn datetimes() {
        assert_eq!(
            value_json(DateTime::from_millis(0)),
            r#""1970-01-01T00:00:00.000Z""#
        );
        assert_eq!(
            value_json(dt(2024, 2, 29, 23, 59, 59, 999)),
            r#""2024-02-29T23:59:59.999Z""#
        );
        assert_eq!(
            value_json(dt(2000, 2, 29, 12, 0, 0, 7)),
            r#""2000-02-29T12:00:00.007Z""#
        );
        assert_eq!(
            value_json(dt(2100, 3, 1, 0, 0, 0, 0)),
            r#""2100-03-01T00:00:00.000Z""#
        );
        assert_eq!(
            value_json(dt(1900, 2, 28, 1, 2, 3, 4)),
            r#""1900-02-28T01:02:03.004Z""#
        );
        // Just before the epoch: negative millis must round toward the earlier day.
        assert_eq!(
            value_json(DateTime::from_millis(-1)),
            r#""1969-12-31T23:59:59.999Z""#
        );
        assert_eq!(
            value_json(DateTime::from_millis(-86_400_000)),
            r#""1969-12-31T00:00:00.000Z""#
        );
        assert_eq!(
            value_json(dt(1600, 2, 29, 0, 0, 0, 0)),
            r#""1600-02-29T00:00:00.000Z""#
        );
        assert_eq!(
            value_json(dt(1, 1, 1, 0, 0, 0, 0)),
            r#""0001-01-01T00:00:00.000Z""#
        );
        assert_eq!(
            value_json(dt(0, 1, 1, 0, 0, 0, 0)),
            r#""0000-01-01T00:00:00.000Z""#
        );
        assert_eq!(
            value_json(dt(9999, 12, 31, 23, 59, 59, 999)),
            r#""9999-12-31T23:59:59.999Z""#
        );
        // Outside 0000..=9999: epoch millis as a number.
        let y10k = dt(9999, 12, 31, 23, 59, 59, 999).timestamp_millis() + 1;
        assert_eq!(value_json(DateTime::from_millis(y10k)), y10k.to_string());
        let before_year_0 = dt(0, 1, 1, 0, 0, 0, 0).timestamp_millis() - 1;
        assert_eq!(
            value_json(DateTime::from_millis(before_year_0)),
            before_year_0.to_string()
        );
        assert_eq!(value_json(DateTime::MAX), i64::MAX.to_string());
        assert_eq!(value_json(DateTime::MIN), i64::MIN.to_string());
    }

    #[test]
    fn civil_from_days_matches_a_day_by_day_walk() {
        // Walk every day from 1600-01-01 to 2500-12-31 with a naive calendar and compare.
        let is_leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let days_in = |y: i64, m: u32| match m {
            2 if is_leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let start = dt(1600, 1, 1, 0, 0, 0, 0).timestamp_millis() / MILLIS_PER_DAY;
        let (mut y, mut m, mut d) = (1600_i64, 1_u32, 1_u32);
        let mut day = start;
        while y <= 2500 {
            assert_eq!(civil_from_days(day), (y, m, d), "day {day}");
            day += 1;
            d += 1;
            if d > days_in(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn timestamp() {
        let ts = Timestamp {
            time: 4_000_000_000,
            increment: 7,
        };
        assert_eq!(value_json(ts), r#"{"t":4000000000,"i":7}"#);
    }

    #[test]
    fn regex_code_symbol() {
        let re = Regex {
            pattern: "^a\"/b$".into(),
            options: "im".into(),
        };
        assert_eq!(value_json(re), r#""/^a\"/b$/im""#);
        assert_eq!(
            value_json(Bson::JavaScriptCode("f(\"x\")".into())),
            r#""f(\"x\")""#
        );
        let cws = JavaScriptCodeWithScope {
            code: "return x;".into(),
            scope: doc! { "x": 1 },
        };
        assert_eq!(
            value_json(Bson::JavaScriptCodeWithScope(cws)),
            r#""return x;""#
        );
        assert_eq!(value_json(Bson::Symbol("sym\n".into())), r#""sym\n""#);
    }

    #[test]
    fn decimal128_canonical_strings() {
        for (input, expected) in [
            ("1.5", "1.5"),
            ("-0", "-0"),
            ("1E+3", "1E+3"),
            ("1000", "1000"),
            ("0.001", "0.001"),
            ("1.000", "1.000"),
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("-Infinity", "-Infinity"),
            (
                "1234567890123456789012345678901234",
                "1234567890123456789012345678901234",
            ),
            (
                "1.234567890123456789012345678901234E+40",
                "1.234567890123456789012345678901234E+40",
            ),
            ("-1.5E-7", "-1.5E-7"),
            ("0E-6176", "0E-6176"),
        ] {
            let d: Decimal128 = input.parse().expect("decimal");
            assert_eq!(value_json(d), format!("\"{expected}\""), "input {input}");
        }
    }

    #[test]
    fn db_pointer() {
        let mut value = bson_string(b"db.coll\"");
        value.extend_from_slice(&[0xab; 12]);
        let bytes = handmade(&[(0x0c, "p", value)]);
        let d = RawDocument::from_bytes(&bytes).expect("valid");
        let mut out = Vec::new();
        write_document(d, false, &mut out, &mut ConvertStats::default()).expect("ok");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            r#"{"p":{"$ref":"db.coll\"","$id":"abababababababababababab"}}"#
        );
    }

    // ----- containers -----

    #[test]
    fn nested_documents_and_arrays() {
        let d = doc! {
            "a": { "b": { "c": [1, "two", { "three": 3.5 }, [], {}] } },
            "e": [],
            "f": {},
            "g": [[1], [[2]]],
        };
        assert_eq!(
            json_of(&d),
            r#"{"a":{"b":{"c":[1,"two",{"three":3.5},[],{}]}},"e":[],"f":{},"g":[[1],[[2]]]}"#
        );
        assert_eq!(json_of(&doc! {}), "{}");
    }

    #[test]
    fn write_value_on_containers() {
        let d = raw(&doc! { "arr": [1, 2], "doc": { "x": "y" } });
        let arr = d.get("arr").expect("valid").expect("present");
        assert_eq!(value_json_raw(arr), "[1,2]");
        let sub = d.get("doc").expect("valid").expect("present");
        assert_eq!(value_json_raw(sub), r#"{"x":"y"}"#);
    }

    #[test]
    fn skip_id() {
        let oid = ObjectId::parse_str("000102030405060708090a0b").expect("hex");
        let d = doc! { "_id": oid, "a": 1, "sub": { "_id": 2 } };
        assert_eq!(
            convert(&d, false).0,
            r#"{"_id":"000102030405060708090a0b","a":1,"sub":{"_id":2}}"#
        );
        // Only the top-level _id goes; a nested one is data.
        assert_eq!(convert(&d, true).0, r#"{"a":1,"sub":{"_id":2}}"#);
        // _id not first, and a document holding only _id.
        assert_eq!(convert(&doc! { "a": 1, "_id": 5 }, true).0, r#"{"a":1}"#);
        assert_eq!(convert(&doc! { "_id": 5 }, true).0, "{}");
    }

    #[test]
    fn appends_to_existing_output() {
        let mut out = b"prefix\n".to_vec();
        write_document(
            &raw(&doc! { "a": 1 }),
            false,
            &mut out,
            &mut ConvertStats::default(),
        )
        .expect("ok");
        assert_eq!(out, b"prefix\n{\"a\":1}");
    }

    // ----- malformed input -----

    #[test]
    fn invalid_utf8_is_malformed_and_output_is_rolled_back() {
        let bytes = handmade(&[
            (0x10, "ok", 1_i32.to_le_bytes().to_vec()),
            (0x01, "nan", f64::NAN.to_le_bytes().to_vec()),
            (0x02, "bad", bson_string(b"\xff\xfe")),
        ]);
        let d = RawDocument::from_bytes(&bytes).expect("header is fine");
        let mut out = b"keep".to_vec();
        let mut stats = ConvertStats::default();
        let err = write_document(d, false, &mut out, &mut stats).expect_err("invalid utf-8");
        assert!(matches!(err, Error::Malformed(_)), "{err:?}");
        assert_eq!(out, b"keep");
        assert_eq!(stats, ConvertStats::default());
    }

    #[test]
    fn invalid_utf8_key_is_malformed() {
        let bytes = handmade(&[(0x10, "k\u{e9}", 1_i32.to_le_bytes().to_vec())]);
        // Corrupt the 'é' (0xc3 0xa9) into a lone continuation byte.
        let mut bytes = bytes;
        let pos = bytes.iter().position(|&b| b == 0xc3).expect("present");
        bytes[pos] = 0xa9;
        let d = RawDocument::from_bytes(&bytes).expect("header is fine");
        let mut out = Vec::new();
        let err = write_document(d, false, &mut out, &mut ConvertStats::default());
        assert!(matches!(err, Err(Error::Malformed(_))), "{err:?}");
        assert!(out.is_empty());
    }

    #[test]
    fn unknown_element_type_and_truncation_are_malformed() {
        let bytes = handmade(&[(0x42, "x", vec![])]);
        let d = RawDocument::from_bytes(&bytes).expect("header is fine");
        let mut out = Vec::new();
        let err = write_document(d, false, &mut out, &mut ConvertStats::default());
        assert!(matches!(err, Err(Error::Malformed(_))), "{err:?}");

        // A string whose length runs past the end of the document.
        let mut bytes = handmade(&[(0x02, "s", bson_string(b"hello"))]);
        let at = bytes.len() - 1 - 6 - 4; // the string's length prefix
        bytes[at..at + 4].copy_from_slice(&100_i32.to_le_bytes());
        let d = RawDocument::from_bytes(&bytes).expect("header is fine");
        let err = write_document(d, false, &mut out, &mut ConvertStats::default());
        assert!(matches!(err, Err(Error::Malformed(_))), "{err:?}");
        assert!(out.is_empty());
    }

    // ----- malformed input: the byte walker -----

    /// Raw document bytes around an already encoded element list.
    fn with_header(body: &[u8]) -> Vec<u8> {
        let mut bytes = ((body.len() + 5) as i32).to_le_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes.push(0);
        bytes
    }

    /// `bytes` has a sound top-level header, but the conversion must fail as malformed and
    /// leave `out` and `stats` as they were, for both values of `skip_id`.
    fn assert_malformed(bytes: &[u8]) {
        let d = RawDocument::from_bytes(bytes).expect("header is fine");
        for skip_id in [false, true] {
            let mut out = b"keep".to_vec();
            let mut stats = ConvertStats {
                non_finite_nulled: 7,
            };
            let err = write_document(d, skip_id, &mut out, &mut stats);
            assert!(
                matches!(err, Err(Error::Malformed(_))),
                "{err:?} for {bytes:?}"
            );
            assert_eq!(out, b"keep", "{bytes:?}");
            assert_eq!(stats.non_finite_nulled, 7);
        }
    }

    /// A document with a few good fields (one of them a NaN, to move the stats) before `bad`.
    fn after_good_fields(bad: &[(u8, &str, Vec<u8>)]) -> Vec<u8> {
        let mut elements = vec![
            (0x10, "ok", 1_i32.to_le_bytes().to_vec()),
            (0x01, "nan", f64::NAN.to_le_bytes().to_vec()),
        ];
        elements.extend(bad.iter().cloned());
        handmade(&elements)
    }

    #[test]
    fn truncated_fixed_size_values_are_malformed() {
        for (tag, len) in [
            (0x01, 8),
            (0x07, 12),
            (0x08, 1),
            (0x09, 8),
            (0x10, 4),
            (0x11, 8),
            (0x12, 8),
            (0x13, 16),
        ] {
            assert_malformed(&after_good_fields(&[(tag, "v", vec![1; len - 1])]));
        }
    }

    #[test]
    fn truncated_length_prefixes_are_malformed() {
        // Fewer than 4 bytes left for the i32 length of each length-prefixed type.
        for tag in [0x02, 0x03, 0x04, 0x05, 0x0c, 0x0d, 0x0e, 0x0f] {
            assert_malformed(&after_good_fields(&[(tag, "v", vec![9, 0, 0])]));
            assert_malformed(&after_good_fields(&[(tag, "v", vec![])]));
        }
    }

    #[test]
    fn lengths_past_the_end_are_malformed() {
        let past = |tag: u8, len: i32, rest: &[u8]| {
            let mut v = len.to_le_bytes().to_vec();
            v.extend_from_slice(rest);
            after_good_fields(&[(tag, "v", v)])
        };
        for tag in [0x02, 0x0c, 0x0d, 0x0e] {
            assert_malformed(&past(tag, 100, b"abc\0"));
            assert_malformed(&past(tag, i32::MAX, b"abc\0"));
            assert_malformed(&past(tag, -1, b"abc\0"));
            // Zero covers not even the NUL.
            assert_malformed(&past(tag, 0, b""));
            // The right length, but the last byte is not a NUL.
            assert_malformed(&past(tag, 4, b"abcd"));
        }
        // Binary: i32 length, subtype, data.
        assert_malformed(&past(0x05, 100, b"\0abc"));
        assert_malformed(&past(0x05, -1, b"\0abc"));
        assert_malformed(&past(0x05, 4, b"\0abc"));
        // Documents, arrays and code with scope.
        assert_malformed(&past(0x03, 100, &[0; 8]));
        assert_malformed(&past(0x04, 100, &[0; 8]));
        assert_malformed(&past(0x0f, 100, &[0; 20]));
        // A DbPointer missing part of its ObjectId.
        let mut dbp = bson_string(b"db.c");
        dbp.extend_from_slice(&[1; 11]);
        assert_malformed(&after_good_fields(&[(0x0c, "v", dbp)]));
    }

    #[test]
    fn a_value_may_not_use_the_documents_terminating_nul() {
        // The string's length claims one more byte: its "NUL" would be the document's own.
        let mut bytes = handmade(&[(0x02, "s", bson_string(b"abc"))]);
        let at = bytes.len() - 1 - 4 - 4;
        bytes[at..at + 4].copy_from_slice(&5_i32.to_le_bytes());
        assert_malformed(&bytes);
    }

    #[test]
    fn missing_key_nul_is_malformed() {
        // The key runs into the end of the document: short (one-word path) and long keys.
        for key in [
            &b"k"[..],
            b"abcdefg",
            b"abcdefgh",
            b"a_much_longer_key_name",
        ] {
            let mut body = vec![0x10];
            body.extend_from_slice(key);
            assert_malformed(&with_header(&body));
            let mut body = 1_i32.to_le_bytes().to_vec();
            body.splice(0..0, [0x10, b'a', 0]);
            body.push(0x10);
            body.extend_from_slice(key);
            assert_malformed(&with_header(&body));
        }
        // A key inside an array.
        let mut array_body = vec![0x10];
        array_body.extend_from_slice(b"0123456789");
        assert_malformed(&after_good_fields(&[(0x04, "a", with_header(&array_body))]));
        // Regular expressions are two C strings.
        assert_malformed(&after_good_fields(&[(0x0b, "re", b"abc".to_vec())]));
        assert_malformed(&after_good_fields(&[(0x0b, "re", b"abc\0i".to_vec())]));
    }

    #[test]
    fn bad_type_bytes_are_malformed() {
        for tag in [0x00, 0x14, 0x15, 0x20, 0x7e, 0x80, 0xfe] {
            assert_malformed(&after_good_fields(&[(tag, "x", vec![1, 2, 3, 4])]));
            // Inside a nested document and an array.
            let inner = handmade(&[(tag, "0", vec![])]);
            assert_malformed(&after_good_fields(&[(0x03, "d", inner.clone())]));
            assert_malformed(&after_good_fields(&[(0x04, "a", inner)]));
        }
    }

    #[test]
    fn nested_length_mismatches_are_malformed() {
        let inner = handmade(&[(0x10, "x", 1_i32.to_le_bytes().to_vec())]);
        for tag in [0x03, 0x04] {
            for delta in [-1_i32, 1, -5, 3] {
                let mut bad = inner.clone();
                let len = inner.len() as i32 + delta;
                bad[..4].copy_from_slice(&len.to_le_bytes());
                // The outer document's length stays right for the bytes it holds.
                assert_malformed(&after_good_fields(&[
                    (tag, "d", bad),
                    (0x10, "y", 2_i32.to_le_bytes().to_vec()),
                ]));
            }
            // Shorter than the 5-byte minimum.
            assert_malformed(&after_good_fields(&[(
                tag,
                "d",
                4_i32.to_le_bytes().to_vec(),
            )]));
            // Right length, but no terminating NUL.
            let mut bad = inner.clone();
            *bad.last_mut().expect("non-empty") = 1;
            assert_malformed(&after_good_fields(&[(tag, "d", bad)]));
        }
        // Code with scope whose parts do not add up to its total length.
        let cws = |total_delta: i32, scope: &[u8]| {
            let code = bson_string(b"f()");
            let total = (4 + code.len() + scope.len()) as i32 + total_delta;
            let mut v = total.to_le_bytes().to_vec();
            v.extend_from_slice(&code);
            v.extend_from_slice(scope);
            after_good_fields(&[(0x0f, "c", v)])
        };
        let scope = handmade(&[(0x10, "x", 1_i32.to_le_bytes().to_vec())]);
        assert!(RawDocument::from_bytes(&cws(0, &scope)).is_ok());
        assert_malformed(&cws(-1, &scope));
        assert_malformed(&cws(1, &scope));
        let mut short_scope = scope.clone();
        short_scope[..4].copy_from_slice(&(scope.len() as i32 - 1).to_le_bytes());
        assert_malformed(&cws(0, &short_scope));
    }

    #[test]
    fn bad_boolean_and_old_binary_are_malformed() {
        assert_malformed(&after_good_fields(&[(0x08, "b", vec![2])]));
        // Old binary subtype 2 whose inner length disagrees with the outer one.
        let mut old = 7_i32.to_le_bytes().to_vec();
        old.push(2);
        old.extend_from_slice(&4_i32.to_le_bytes());
        old.extend_from_slice(b"foo");
        assert_malformed(&after_good_fields(&[(0x05, "v", old)]));
        let mut old = 2_i32.to_le_bytes().to_vec();
        old.extend_from_slice(&[2, 0, 0]);
        assert_malformed(&after_good_fields(&[(0x05, "v", old)]));
    }

    #[test]
    fn a_skipped_id_is_still_checked() {
        let mut bytes = handmade(&[
            (0x02, "_id", bson_string(b"abc")),
            (0x10, "a", 1_i32.to_le_bytes().to_vec()),
        ]);
        let at = 4 + 1 + 4; // the string's length prefix
        bytes[at..at + 4].copy_from_slice(&100_i32.to_le_bytes());
        assert_malformed(&bytes);
    }

    #[test]
    fn invalid_utf8_anywhere_in_a_string_or_key_is_malformed() {
        // Bad bytes in the first word, in a later word, and in the padded tail.
        for s in [
            &b"\xff"[..],
            b"abc\xc3",
            b"abcdefgh\xff",
            b"abcdefghijklmnop\xe2\x82",
            b"abcdefg\xc3\x28hijklmnopqrstuvwxyz",
            b"\"quoted\"\n\xed\xa0\x80",
        ] {
            assert_malformed(&after_good_fields(&[(0x02, "s", bson_string(s))]));
            assert_malformed(&after_good_fields(&[(0x0d, "s", bson_string(s))]));
            let mut key = vec![0x10];
            key.extend_from_slice(s);
            key.push(0);
            key.extend_from_slice(&1_i32.to_le_bytes());
            assert_malformed(&with_header(&key));
            let mut regex = s.to_vec();
            regex.extend_from_slice(b"\0i\0");
            assert_malformed(&after_good_fields(&[(0x0b, "re", regex)]));
            let mut dbp = bson_string(s);
            dbp.extend_from_slice(&[1; 12]);
            assert_malformed(&after_good_fields(&[(0x0c, "p", dbp)]));
        }
    }

    #[test]
    fn keys_of_every_length_and_escape_position() {
        for n in 0..20 {
            let plain = "k".repeat(n);
            for key in [
                plain.clone(),
                format!("{plain}\""),
                format!("\n{plain}"),
                format!("{plain}é"),
            ] {
                let expected = format!("{{{}:1}}", serde_json::to_string(&key).expect("json"));
                assert_eq!(json_of(&doc! { key.as_str(): 1 }), expected);
            }
        }
        // Keys of an array are never written, whatever they are, but they must be UTF-8.
        let array = handmade(&[
            (0x10, "not\"an index", 1_i32.to_le_bytes().to_vec()),
            (0x10, "", 2_i32.to_le_bytes().to_vec()),
        ]);
        let bytes = handmade(&[(0x04, "a", array)]);
        let d = RawDocument::from_bytes(&bytes).expect("valid");
        let mut out = Vec::new();
        write_document(d, false, &mut out, &mut ConvertStats::default()).expect("ok");
        assert_eq!(out, br#"{"a":[1,2]}"#);
        for key in [&b"\xff"[..], b"0\xc3", b"0123456789\xff"] {
            let mut element = vec![0x10];
            element.extend_from_slice(key);
            element.push(0);
            element.extend_from_slice(&1_i32.to_le_bytes());
            assert_malformed(&after_good_fields(&[(0x04, "a", with_header(&element))]));
        }
    }

    #[test]
    fn non_ascii_regex_and_db_pointer_via_write_value() {
        let re = Regex {
            pattern: "é+\u{1}".into(),
            options: "i".into(),
        };
        assert_eq!(value_json(re), "\"/é+\\u0001/i\"");
        let mut value = bson_string("db.ç".as_bytes());
        value.extend_from_slice(&[0xab; 12]);
        let bytes = handmade(&[(0x0c, "p", value)]);
        let d = RawDocument::from_bytes(&bytes).expect("valid");
        let expected = r#"{"$ref":"db.ç","$id":"abababababababababababab"}"#;
        assert_eq!(json_of_raw(d), format!(r#"{{"p":{expected}}}"#));
        // The same value through `write_value`, which takes bson's own decoding of it.
        let p = d.get("p").expect("valid").expect("present");
        assert_eq!(value_json_raw(p), expected);
    }

    fn json_of_raw(d: &RawDocument) -> String {
        let mut out = Vec::new();
        write_document(d, false, &mut out, &mut ConvertStats::default()).expect("ok");
        String::from_utf8(out).expect("utf-8")
    }

    /// Whether bson's own iterator accepts every element of `d` and every value in it, at
    /// every depth.
    fn bson_accepts(d: &RawDocument) -> bool {
        d.iter_elements().all(|e| {
            let Ok(v) = e.and_then(|e| e.value()) else {
                return false;
            };
            match v {
                RawBsonRef::Document(d) => bson_accepts(d),
                RawBsonRef::Array(a) => {
                    RawDocument::from_bytes(a.as_bytes()).is_ok_and(bson_accepts)
                }
                _ => true,
            }
        })
    }

    #[test]
    fn excessive_nesting_is_rejected_not_a_stack_overflow() {
        let mut d = doc! { "leaf": 1 };
        for _ in 0..(MAX_DEPTH + 5) {
            d = doc! { "n": d };
        }
        let mut out = Vec::new();
        let err = write_document(&raw(&d), false, &mut out, &mut ConvertStats::default());
        assert!(matches!(err, Err(Error::Malformed(_))), "{err:?}");
        // MongoDB's own limit (100 levels) is well within ours.
        let mut d = doc! { "leaf": 1 };
        for _ in 0..100 {
            d = doc! { "n": [d] };
        }
        write_document(&raw(&d), false, &mut out, &mut ConvertStats::default()).expect("ok");
    }

    // ----- Elasticsearch _id -----

    #[test]
    fn es_ids_of_common_types() {
        let oid = ObjectId::parse_str("5f1d7a3b9c0e4b2a1c3d4e5f").expect("hex");
        assert_eq!(es_id(oid), "5f1d7a3b9c0e4b2a1c3d4e5f");
        assert_eq!(es_id("user:42"), "user:42");
        assert_eq!(es_id("quote\" and \\ and \n"), "quote\" and \\ and \n");
        assert_eq!(es_id(5), "5");
        assert_eq!(es_id(5_i64), "5");
        assert_eq!(es_id(5.0), "5");
        assert_eq!(es_id(-7), "-7");
        assert_eq!(es_id(-0.0), "0");
        assert_eq!(es_id(2.5), "2.5");
        assert_eq!(es_id(1e20), "1e20");
        assert_eq!(es_id(i64::MAX), "9223372036854775807");
        assert_eq!(es_id(-9_223_372_036_854_775_808.0), "-9223372036854775808");
        assert_eq!(es_id(f64::NAN), "NaN");
        assert_eq!(es_id(f64::NEG_INFINITY), "-Infinity");
        let dec: Decimal128 = "1.5".parse().expect("decimal");
        assert_eq!(es_id(dec), "1.5");
    }

    #[test]
    fn equal_numeric_ids_give_equal_es_ids() {
        assert_eq!(es_id(5), es_id(5_i64));
        assert_eq!(es_id(5), es_id(5.0));
        let big = 1_i64 << 60;
        assert_eq!(es_id(big), es_id(big as f64));
    }

    #[test]
    fn es_ids_of_other_types_are_relaxed_extjson() {
        assert_eq!(es_id(true), "true");
        assert_eq!(es_id(Bson::Null), "null");
        assert_eq!(es_id(doc! { "b": 1, "a": "x" }), r#"{"b":1,"a":"x"}"#);
        assert_eq!(es_id(doc! { "a": "x", "b": 1 }), r#"{"a":"x","b":1}"#);
        let uuid = Binary {
            subtype: BinarySubtype::Uuid,
            bytes: vec![0x11; 16],
        };
        assert_eq!(
            es_id(uuid),
            r#"{"$binary":{"base64":"EREREREREREREREREREREQ==","subType":"04"}}"#
        );
        assert_eq!(
            es_id(dt(2024, 1, 2, 3, 4, 5, 6)),
            r#"{"$date":"2024-01-02T03:04:05.006Z"}"#
        );
        assert_eq!(
            es_id(DateTime::from_millis(-1)),
            r#"{"$date":{"$numberLong":"-1"}}"#
        );
        assert_eq!(
            es_id(
                doc! { "d": 1.0, "n": f64::NAN, "o": ObjectId::parse_str("000102030405060708090a0b").expect("hex") }
            ),
            r#"{"d":1.0,"n":{"$numberDouble":"NaN"},"o":{"$oid":"000102030405060708090a0b"}}"#
        );
        assert_eq!(
            es_id(Timestamp {
                time: 1,
                increment: 2
            }),
            r#"{"$timestamp":{"t":1,"i":2}}"#
        );
        assert_eq!(es_id(Bson::MinKey), r#"{"$minKey":1}"#);
    }

    #[test]
    fn extjson_ids_agree_with_bson_relaxed_extjson() {
        // Same JSON value as bson's own relaxed Extended JSON (compared as values, because
        // serde_json's map may reorder keys). Dates are left out: bson drops zero milliseconds.
        let dec: Decimal128 = "-12.50".parse().expect("decimal");
        let values = vec![
            Bson::Document(doc! { "a": [1, 2.5, "s", { "x": Bson::Null }], "i": 9_i64 }),
            Bson::Binary(Binary {
                subtype: BinarySubtype::Generic,
                bytes: b"hello".to_vec(),
            }),
            Bson::Binary(Binary {
                subtype: BinarySubtype::UserDefined(0x85),
                bytes: vec![1],
            }),
            Bson::RegularExpression(Regex {
                pattern: "a+".into(),
                options: "xi".into(),
            }),
            Bson::JavaScriptCode("f()".into()),
            Bson::JavaScriptCodeWithScope(JavaScriptCodeWithScope {
                code: "g()".into(),
                scope: doc! { "y": 2 },
            }),
            Bson::Symbol("sym".into()),
            Bson::Timestamp(Timestamp {
                time: 10,
                increment: 20,
            }),
            Bson::Document(doc! { "d": dec }),
            Bson::Undefined,
            Bson::MaxKey,
            Bson::Document(doc! { "inf": f64::INFINITY, "ninf": f64::NEG_INFINITY }),
            Bson::Document(
                doc! { "oid": ObjectId::parse_str("000102030405060708090a0b").expect("hex") },
            ),
        ];
        for v in values {
            let ours: Value = serde_json::from_str(&es_id(v.clone())).expect("valid json");
            assert_eq!(ours, v.clone().into_relaxed_extjson(), "{v:?}");
        }
    }

    #[test]
    fn db_pointer_id() {
        let mut value = bson_string(b"db.c");
        value.extend_from_slice(&[0x01; 12]);
        let bytes = handmade(&[(0x0c, "_id", value)]);
        let d = RawDocument::from_bytes(&bytes).expect("valid");
        let id = d.get("_id").expect("valid").expect("present");
        assert_eq!(
            es_id_string(id).expect("ok"),
            r#"{"$dbPointer":{"$ref":"db.c","$id":{"$oid":"010101010101010101010101"}}}"#
        );
    }

    #[test]
    fn too_long_ids_are_rejected() {
        let ok = "x".repeat(MAX_ES_ID_BYTES);
        assert_eq!(es_id(ok.as_str()), ok);
        // The limit counts UTF-8 bytes, not characters: 257 × 'é' (2 bytes each) = 514 bytes.
        let long = "é".repeat(257);
        let d = raw(&doc! { "_id": long.as_str() });
        let id = d.get("_id").expect("valid").expect("present");
        let mut out = b"keep".to_vec();
        assert_eq!(write_es_id(id, &mut out), Err(Error::IdTooLong(514)));
        assert_eq!(out, b"keep");
        assert_eq!(es_id_string(id), Err(Error::IdTooLong(514)));
        // Composite ids are measured on their text.
        let d = raw(&doc! { "_id": { "k": "y".repeat(600) } });
        let id = d.get("_id").expect("valid").expect("present");
        assert_eq!(write_es_id(id, &mut out), Err(Error::IdTooLong(608)));
        assert_eq!(out, b"keep");
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            Error::Malformed("x".into()).to_string(),
            "malformed BSON: x"
        );
        assert!(Error::IdTooLong(600).to_string().contains("600 bytes"));
    }

    // ----- property tests -----

    /// Independent reference: the documented mapping, applied to the owned `Bson` tree.
    fn reference(b: &Bson) -> Value {
        match b {
            Bson::Double(f) if f.is_finite() => json!(f),
            Bson::Double(_) => Value::Null,
            Bson::String(s) => json!(s),
            Bson::Int32(i) => json!(i),
            Bson::Int64(i) => json!(i),
            Bson::Boolean(v) => json!(v),
            Bson::Null => Value::Null,
            Bson::Array(a) => Value::Array(a.iter().map(reference).collect()),
            Bson::Document(d) => {
                Value::Object(d.iter().map(|(k, v)| (k.clone(), reference(v))).collect())
            }
            Bson::ObjectId(oid) => json!(oid.to_hex()),
            other => panic!("reference does not cover {other:?}"),
        }
    }

    /// Value equality that lets floats differ in the last few bits: serde_json parses floats
    /// with correct rounding only when its `float_roundtrip` feature is on. Exact round-trips of
    /// our float text are checked separately with std's correctly rounded parser.
    fn assert_json_eq(a: &Value, b: &Value) {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                let (x, y) = (x.as_f64().expect("f64"), y.as_f64().expect("f64"));
                // Distance in units in the last place. It also works for subnormals, where a
                // relative tolerance does not.
                let ulps = (x.to_bits() as i64)
                    .wrapping_sub(y.to_bits() as i64)
                    .unsigned_abs();
                assert!(
                    x == y || (x.signum() == y.signum() && ulps <= 8),
                    "{x:e} != {y:e}"
                );
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(x.len(), y.len());
                x.iter().zip(y).for_each(|(x, y)| assert_json_eq(x, y));
            }
            (Value::Object(x), Value::Object(y)) => {
                assert_eq!(x.len(), y.len());
                for (k, v) in x {
                    assert_json_eq(v, y.get(k).expect("same keys"));
                }
            }
            _ => assert_eq!(a, b),
        }
    }

    fn finite_f64() -> impl Strategy<Value = f64> {
        prop::num::f64::POSITIVE
            | prop::num::f64::NEGATIVE
            | prop::num::f64::NORMAL
            | prop::num::f64::SUBNORMAL
            | prop::num::f64::ZERO
    }

    fn arb_key() -> impl Strategy<Value = String> {
        // BSON keys are C strings: no NUL.
        "[^\u{0}]{0,12}"
    }

    fn arb_bson() -> impl Strategy<Value = Bson> {
        let leaf = prop_oneof![
            any::<String>().prop_map(Bson::String),
            any::<i32>().prop_map(Bson::Int32),
            any::<i64>().prop_map(Bson::Int64),
            finite_f64().prop_map(Bson::Double),
            any::<bool>().prop_map(Bson::Boolean),
            Just(Bson::Null),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Bson::Array),
                prop::collection::vec((arb_key(), inner), 0..8)
                    .prop_map(|kvs| Bson::Document(kvs.into_iter().collect())),
            ]
        })
    }

    fn arb_document() -> impl Strategy<Value = Document> {
        prop::collection::vec((arb_key(), arb_bson()), 0..10)
            .prop_map(|kvs| kvs.into_iter().collect())
    }

    proptest! {
        #[test]
        fn documents_match_reference(d in arb_document(), skip_id in any::<bool>()) {
            let (text, stats) = convert(&d, skip_id);
            prop_assert_eq!(stats.non_finite_nulled, 0);
            let ours: Value = serde_json::from_str(&text).expect("valid JSON");
            let mut expected = d.clone();
            if skip_id {
                expected.remove("_id");
            }
            let expected = Bson::Document(expected);
            assert_json_eq(&ours, &reference(&expected));
            // For these types our shapes coincide with relaxed Extended JSON as well.
            assert_json_eq(&ours, &expected.into_relaxed_extjson());
        }

        #[test]
        fn strings_escape_exactly_like_serde_json(s in any::<String>()) {
            let ours = value_json(s.as_str());
            prop_assert_eq!(&ours, &serde_json::to_string(&s).expect("json"));
            let back: String = serde_json::from_str(&ours).expect("valid JSON");
            prop_assert_eq!(back, s);
        }

        #[test]
        fn ascii_heavy_strings_round_trip(s in "[\u{0}-\u{7f}]{0,64}") {
            let ours = value_json(s.as_str());
            prop_assert_eq!(&ours, &serde_json::to_string(&s).expect("json"));
        }

        #[test]
        fn doubles_round_trip_exactly(f in finite_f64()) {
            let text = value_json(f);
            let back: f64 = text.parse().expect("a number");
            prop_assert_eq!(back.to_bits(), f.to_bits());
        }

        #[test]
        fn datetimes_match_bson(millis in -62_167_219_200_000_i64..253_402_300_800_000_i64) {
            // Years 0000..=9999. bson's RFC 3339 text, normalised to always carry milliseconds.
            let d = DateTime::from_millis(millis);
            let theirs = d.try_to_rfc3339_string().expect("in range");
            // bson drops trailing zeros of the fraction ("…:51.15Z", "…:51Z").
            let body = theirs.strip_suffix('Z').expect("UTC");
            let (whole, fraction) = body.split_once('.').unwrap_or((body, ""));
            let theirs = format!("{whole}.{fraction:0<3}Z");
            prop_assert_eq!(value_json(d), format!("\"{theirs}\""));
        }

        #[test]
        fn corrupted_documents_never_panic(
            d in arb_document(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = raw(&d).into_bytes();
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if let Ok(doc) = RawDocument::from_bytes(&bytes) {
                let mut out = Vec::new();
                let mut stats = ConvertStats::default();
                if write_document(doc, true, &mut out, &mut stats).is_ok() {
                    let _: Value = serde_json::from_slice(&out).expect("valid JSON");
                } else {
                    prop_assert!(out.is_empty());
                }
            }
        }

        #[test]
        fn walker_accepts_exactly_what_bson_accepts(
            d in arb_document(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = raw(&d).into_bytes();
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if let Ok(doc) = RawDocument::from_bytes(&bytes) {
                let mut out = Vec::new();
                let result = write_document(doc, false, &mut out, &mut ConvertStats::default());
                prop_assert_eq!(result.is_ok(), bson_accepts(doc), "{:?}", result);
            }
        }

        #[test]
        fn int_and_integral_double_ids_agree(i in -(1_i64 << 53)..(1_i64 << 53)) {
            prop_assert_eq!(es_id(i), es_id(i as f64));
            if let Ok(small) = i32::try_from(i) {
                prop_assert_eq!(es_id(small), es_id(i));
            }
        }
    }
}
