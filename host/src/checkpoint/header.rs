//! The safetensors container: an 8-byte little-endian header length, a JSON header, then the
//! tensor bytes. Parsed by hand so that every defect gets a message naming the tensor at fault.

use std::collections::HashSet;
use std::fmt;

use anyhow::{bail, Context, Result};
use kvant_plugin_api::{DType, TensorSpec};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// Key of the free-form string map in a safetensors header.
const METADATA_KEY: &str = "__metadata__";

/// A larger header means a corrupt length, not a real model (safetensors itself caps it the same way).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a validated header: its spec and its byte range within the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderTensor {
    pub spec: TensorSpec,
    pub begin: usize,
    pub end: usize,
}

/// A validated header: tensors in data order and where the data section starts in the file.
#[derive(Debug)]
pub(crate) struct Header {
    pub data_start: usize,
    pub tensors: Vec<HeaderTensor>,
}

/// Parses and validates the header of a safetensors file whose full contents are `bytes`.
///
/// Errors do not name the file; the caller adds it as context.
pub(crate) fn parse(bytes: &[u8]) -> Result<Header> {
    let Some(len_bytes) = bytes.get(..8) else {
        bail!(
            "file is truncated: {} bytes, too short for the 8-byte header length",
            bytes.len()
        );
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    let file_len = bytes.len() as u64;
    if header_len > file_len - 8 {
        bail!(
            "header length {header_len} goes past the end of the file ({file_len} bytes): \
             the file is truncated or not a safetensors file"
        );
    }
    if header_len > MAX_HEADER_BYTES {
        bail!("header length {header_len} exceeds {MAX_HEADER_BYTES} bytes: the file is corrupt");
    }
    let data_start = 8 + header_len as usize;
    let header_bytes = &bytes[8..data_start];
    let text = std::str::from_utf8(header_bytes)
        .map_err(|e| anyhow::anyhow!("header is not valid UTF-8 JSON: {e}"))?;
    let entries: UniqueKeyMap = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            // Well-formed JSON of the wrong shape, or a tensor named twice.
            anyhow::anyhow!("header is not a safetensors header: {e}")
        } else {
            anyhow::anyhow!(
                "header is not valid JSON ({e}); the file is corrupt or not a safetensors file"
            )
        }
    })?;

    let data_len = bytes.len() - data_start;
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if name == METADATA_KEY {
            check_metadata(&value)?;
            continue;
        }
        let tensor = parse_entry(&name, &value)
            .with_context(|| format!("header entry for tensor `{name}`"))?;
        if tensor.end > data_len {
            bail!(
                "tensor `{name}` has data_offsets [{}, {}] past the end of the data section \
                 ({data_len} bytes): the file is truncated or corrupt",
                tensor.begin,
                tensor.end
            );
        }
        tensors.push(tensor);
    }
    check_contiguous(&mut tensors, data_len)?;
    Ok(Header {
        data_start,
        tensors,
    })
}

/// `__metadata__` maps strings to strings; safetensors' own loader refuses anything else, so a
/// file kvant accepted here would fail to load elsewhere.
fn check_metadata(value: &Value) -> Result<()> {
    let Some(fields) = value.as_object() else {
        bail!("header field `{METADATA_KEY}` must be a JSON object, found {value}");
    };
    if let Some((key, v)) = fields.iter().find(|(_, v)| !v.is_string()) {
        bail!("header field `{METADATA_KEY}.{key}` must be a string, found {v}: the file is corrupt");
    }
    Ok(())
}

/// Checks one tensor's dtype, shape and offsets, independently of the others.
fn parse_entry(name: &str, value: &Value) -> Result<HeaderTensor> {
    let Some(fields) = value.as_object() else {
        bail!("expected a JSON object with dtype, shape and data_offsets, found {value}");
    };
    let field = |key: &str| {
        fields
            .get(key)
            .with_context(|| format!("missing field `{key}`"))
    };

    let dtype_value = field("dtype")?;
    let dtype_name = dtype_value
        .as_str()
        .with_context(|| format!("`dtype` must be a string, found {dtype_value}"))?;
    // Only the exact safetensors spelling is valid here; DType::parse also accepts PyTorch names.
    let dtype = DType::ALL
        .into_iter()
        .find(|d| d.name() == dtype_name)
        .with_context(|| {
            let supported: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
            format!(
                "unknown or unsupported dtype `{dtype_name}` (kvant supports {})",
                supported.join(", ")
            )
        })?;

    let shape_value = field("shape")?;
    let shape: Vec<usize> = shape_value
        .as_array()
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        })
        .with_context(|| {
            format!("`shape` must be an array of non-negative integers, found {shape_value}")
        })?;

    let offsets_value = field("data_offsets")?;
    let (begin, end) = match offsets_value.as_array().map(Vec::as_slice) {
        Some([b, e]) => match (b.as_u64(), e.as_u64()) {
            (Some(b), Some(e)) => (b, e),
            _ => bail!("`data_offsets` must be two non-negative integers, found {offsets_value}"),
        },
        _ => bail!("`data_offsets` must be [begin, end], found {offsets_value}"),
    };
    if begin > end {
        bail!("data_offsets [{begin}, {end}] end before they begin");
    }
    let (begin, end) = (
        usize::try_from(begin).context("data offset does not fit in memory")?,
        usize::try_from(end).context("data offset does not fit in memory")?,
    );

    let spec = TensorSpec::new(name, dtype, shape);
    let expected =
        checked_byte_len(&spec).with_context(|| {
            format!("shape {:?} is too large: its byte size overflows", spec.shape)
        })?;
    if end - begin != expected {
        bail!(
            "data_offsets [{begin}, {end}] hold {} bytes, but dtype {dtype} with shape {:?} needs {expected}",
            end - begin,
            spec.shape
        );
    }
    Ok(HeaderTensor { spec, begin, end })
}

/// `spec.byte_len()` without overflow.
pub(crate) fn checked_byte_len(spec: &TensorSpec) -> Option<usize> {
    spec.shape
        .iter()
        .try_fold(spec.dtype.size(), |acc, &d| acc.checked_mul(d))
}

/// Sorts tensors by offset and checks they tile the data section exactly: no gap, no overlap,
/// nothing left over.
fn check_contiguous(tensors: &mut [HeaderTensor], data_len: usize) -> Result<()> {
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut cursor = 0usize;
    let mut previous: Option<&HeaderTensor> = None;
    for t in tensors.iter() {
        if t.begin < cursor {
            bail!(
                "tensor `{}` (bytes {}..{}) overlaps tensor `{}` (bytes {}..{cursor}): the header is corrupt",
                t.spec.name,
                t.begin,
                t.end,
                previous.map_or("", |p| p.spec.name.as_str()),
                previous.map_or(0, |p| p.begin)
            );
        }
        if t.begin > cursor {
            bail!(
                "gap of {} unused bytes before tensor `{}` (data_offsets start at {}, previous data ends at {cursor}): \
                 the header is corrupt",
                t.begin - cursor,
                t.spec.name,
                t.begin
            );
        }
        cursor = t.end;
        previous = Some(t);
    }
    if cursor != data_len {
        bail!(
            "{} bytes after the last tensor are not described by the header (data section is {data_len} bytes, \
             tensors cover {cursor}): the header is corrupt",
            data_len - cursor
        );
    }
    Ok(())
}

/// Serializes a header for tensors laid out back to back in the given order, padded with spaces
/// so the data section starts 8-byte aligned (as safetensors does). Returns the full prefix:
/// length, JSON and padding.
pub(crate) fn serialize(tensors: &[TensorSpec]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert(METADATA_KEY.into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for spec in tensors {
        let end = offset + spec.byte_len();
        map.insert(
            spec.name.clone(),
            serde_json::json!({
                "dtype": spec.dtype.name(),
                "shape": spec.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(map)).expect("a JSON map always serializes");
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut prefix = Vec::with_capacity(8 + json.len());
    prefix.extend_from_slice(&(json.len() as u64).to_le_bytes());
    prefix.extend_from_slice(&json);
    prefix
}

/// A JSON object read in order that rejects a key given twice (plain `Value` would keep the last).
struct UniqueKeyMap(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for UniqueKeyMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;
        impl<'de> Visitor<'de> for MapVisitor {
            type Value = UniqueKeyMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a JSON object mapping tensor names to their dtype, shape and data_offsets",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeyMap, A::Error> {
                let mut seen = HashSet::new();
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "tensor `{key}` appears twice"
                        )));
                    }
                    entries.push((key, value));
                }
                Ok(UniqueKeyMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    fn error(bytes: &[u8]) -> String {
        format!("{:#}", parse(bytes).unwrap_err())
    }

    #[test]
    fn serialized_header_parses_back_aligned() {
        let specs = [
            TensorSpec::new("a", DType::F32, [2, 3]),
            TensorSpec::new("b", DType::U8, [5]),
            TensorSpec::new("empty", DType::F16, [0]),
        ];
        let mut bytes = serialize(&specs);
        assert_eq!(bytes.len() % 8, 0);
        bytes.resize(bytes.len() + 24 + 5, 7);
        let header = parse(&bytes).unwrap();
        assert_eq!(header.data_start, bytes.len() - 29);
        let names: Vec<_> = header
            .tensors
            .iter()
            .map(|t| t.spec.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b", "empty"]);
        assert_eq!((header.tensors[1].begin, header.tensors[1].end), (24, 29));
        assert_eq!(header.tensors[0].spec, specs[0]);
        // The safetensors crate accepts what we write.
        safetensors::SafeTensors::deserialize(&bytes).unwrap();
    }

    #[test]
    fn rejects_short_file_and_long_header_length() {
        assert!(error(&[1, 2, 3]).contains("truncated"));
        let mut bytes = file("{}", 0);
        bytes[0] = 200;
        assert!(error(&bytes).contains("header length 200 goes past the end of the file"));
    }

    #[test]
    fn rejects_non_json_and_duplicate_keys() {
        assert!(error(&file("{not json", 0)).contains("header is not valid JSON"));
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(error(&file(dup, 2)).contains("tensor `a` appears twice"));
    }

    #[test]
    fn rejects_non_object_headers_and_non_string_metadata() {
        let msg = error(&file("[1,2]", 0));
        assert!(msg.starts_with("header is not a safetensors header: invalid type: sequence"), "{msg}");
        assert!(parse(&file(r#"{"__metadata__":{"format":"pt"}}"#, 0)).is_ok());
        let msg = error(&file(r#"{"__metadata__":{"format":"pt","step":5}}"#, 0));
        assert!(msg.contains("`__metadata__.step` must be a string, found 5"), "{msg}");
    }

    #[test]
    fn rejects_bad_entries_naming_the_tensor() {
        let unknown = r#"{"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#;
        let msg = error(&file(unknown, 1));
        assert!(
            msg.contains("tensor `w`") && msg.contains("unsupported dtype `F8_E4M3`"),
            "{msg}"
        );

        let wrong_len = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        let msg = error(&file(wrong_len, 4));
        assert!(
            msg.contains("tensor `w`") && msg.contains("hold 4 bytes") && msg.contains("needs 8"),
            "{msg}"
        );

        let missing = r#"{"w":{"dtype":"F32","data_offsets":[0,4]}}"#;
        assert!(error(&file(missing, 4)).contains("missing field `shape`"));
    }

    #[test]
    fn rejects_offsets_out_of_range_gaps_overlaps_and_leftovers() {
        let past = r#"{"w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#;
        let msg = error(&file(past, 4));
        assert!(
            msg.contains("`w`") && msg.contains("past the end of the data section"),
            "{msg}"
        );

        let gap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#;
        let msg = error(&file(gap, 5));
        assert!(
            msg.contains("gap of 1 unused bytes before tensor `b`"),
            "{msg}"
        );

        let overlap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
        let msg = error(&file(overlap, 3));
        assert!(
            msg.contains("tensor `b`") && msg.contains("overlaps tensor `a`"),
            "{msg}"
        );

        let leftover = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        assert!(error(&file(leftover, 6)).contains("4 bytes after the last tensor"));
    }
}
