//! A view as a JSON value, and JSON text read back as one: the one path
//! every section of the page takes (docs/hub.md#size).

use serde::Serialize;
use serde_json::Value;

/// A view as a JSON value (null if it cannot be one: a path that is not
/// UTF-8). Written as JSON text and read back: serde's writer code for
/// each field type is in the binary already, its code to build values
/// field by field is not (docs/hub.md#size).
pub(super) fn value(v: impl Serialize) -> Value {
    parse(serde_json::to_vec(&v).ok().as_deref())
}

/// JSON text as a value (null if it is not JSON).
#[inline(never)]
pub(super) fn parse(json: Option<&[u8]>) -> Value {
    json.and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default()
}
