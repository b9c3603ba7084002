//! Strict JSON: parsed straight into typed structures, duplicate keys refused.
//!
//! `serde_json::Value` (and any map type) keeps the last of two equal keys,
//! so `{"cmd":"ping","cmd":"clear"}` read through a `Value` runs `clear`,
//! and a `Value` of a large document costs ~17 times its text. Nothing here
//! goes through a `Value`:
//!
//! - structs derived with serde refuse a repeated field themselves
//!   (`duplicate field`), also inside internally tagged enums and
//!   `#[serde(flatten)]`; every type read through this module is such a
//!   struct or enum, never a map;
//! - the envelope and the `cmd` tag of a request, read by hand here, check
//!   their keys explicitly;
//! - the request's arguments are read from a borrowed slice of the line
//!   ([`RawValue`]), never copied.
//!
//! Peak memory of parsing one request line is the typed result plus a small
//! constant (measured in `docs/reliability.md`, "Duplicate keys and memory").

use std::fmt;

use serde::de::{self, DeserializeOwned, IgnoredAny, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Parses `bytes` as one JSON document into `T`, refusing duplicate keys
/// anywhere (also inside parts `T` keeps as `serde_json::Value`, which the
/// state file does with its rules until each is vetted) and naming the
/// path of a bad field (`rules[3].ports: …`).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    check_unique_keys(bytes)?;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(with_path)?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// [`from_slice`] for a borrowing `T` (e.g. one holding [`RawValue`]s).
pub(crate) fn from_str<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(with_path)?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// `path: message`, or the message alone for an error at the top.
fn with_path(e: serde_path_to_error::Error<serde_json::Error>) -> String {
    match e.path().to_string().as_str() {
        "." => e.inner().to_string(),
        path => format!("{path}: {}", e.inner()),
    }
}

fn duplicate<E: de::Error>(key: &str) -> E {
    E::custom(format_args!(
        "duplicate key {key:?}: every key may appear once"
    ))
}

/// The envelope `{"version":…,"request":…}` with its parts still as text.
pub(crate) struct RawEnvelope<'a> {
    /// The `version` value, unparsed.
    pub version: Option<&'a RawValue>,
    /// The `request` value, unparsed.
    pub request: Option<&'a RawValue>,
    /// The first key that is neither.
    pub unknown: Option<String>,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawEnvelope<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEnvelope<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object {\"version\":…,\"request\":…}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut env = RawEnvelope {
                    version: None,
                    request: None,
                    unknown: None,
                };
                while let Some(key) = map.next_key::<String>()? {
                    let slot = match key.as_str() {
                        "version" => &mut env.version,
                        "request" => &mut env.request,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            env.unknown.get_or_insert(key);
                            continue;
                        }
                    };
                    if slot.is_some() {
                        return Err(duplicate(&key));
                    }
                    *slot = Some(map.next_value()?);
                }
                Ok(env)
            }
        }
        d.deserialize_map(V)
    }
}

/// The `cmd` of a request object; every other key is skipped here (and
/// checked when the arguments are read).
pub(crate) fn command(raw: &RawValue) -> Result<Option<String>, String> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut cmd = None;
            while let Some(key) = map.next_key::<String>()? {
                if key != "cmd" {
                    map.next_value::<IgnoredAny>()?;
                } else if cmd.is_some() {
                    return Err(duplicate(&key));
                } else {
                    cmd = Some(map.next_value::<String>()?);
                }
            }
            Ok(cmd)
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de::Deserializer::deserialize_map(&mut de, V).map_err(|e| e.to_string())
}

/// Reads a request's arguments as `T`, skipping its `cmd` key (already read
/// by [`command`]); errors name the field's path.
pub(crate) fn arguments<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let value = serde_path_to_error::deserialize(SkipCmd(&mut de)).map_err(with_path)?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// A deserializer of one JSON object that hides its `cmd` entry from the
/// type being read (whose `deny_unknown_fields` would refuse it).
struct SkipCmd<D>(D);

impl<'de, D: de::Deserializer<'de>> de::Deserializer<'de> for SkipCmd<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(SkipCmdVisitor(visitor))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct SkipCmdVisitor<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for SkipCmdVisitor<V> {
    type Value = V::Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(SkipCmdMap(map))
    }
}

struct SkipCmdMap<A>(A);

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SkipCmdMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        loop {
            match self.0.next_key::<String>()? {
                None => return Ok(None),
                Some(key) if key == "cmd" => {
                    self.0.next_value::<IgnoredAny>()?;
                }
                Some(key) => return seed.deserialize(key.into_deserializer()).map(Some),
            }
        }
    }

    fn next_value_seed<S: de::DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, A::Error> {
        self.0.next_value_seed(seed)
    }
}

/// Reads a JSON array as `Vec<T>` allocated once at its exact length (a
/// first pass counts the elements without allocating): a growing `Vec`
/// can hold twice the room it needs, and a rule is 200 bytes typed. Errors
/// start with the element's path (`[3].ports: …`, or `: …` for the array).
pub(crate) fn exact_vec<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Result<Vec<T>, String> {
    let len = count_elements(raw)?;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let mut track = serde_path_to_error::Track::new();
    let seed = ExactVec::<T>(len, std::marker::PhantomData);
    let result = de::DeserializeSeed::deserialize(
        seed,
        serde_path_to_error::Deserializer::new(&mut de, &mut track),
    );
    match result {
        Ok(v) => Ok(v),
        Err(e) => Err(match track.path().to_string().as_str() {
            "." => format!(": {e}"),
            path => format!("{path}: {e}"),
        }),
    }
}

fn count_elements(raw: &RawValue) -> Result<usize, String> {
    struct Count;
    impl<'de> Visitor<'de> for Count {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON array")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de::Deserializer::deserialize_seq(&mut de, Count).map_err(|e| e.to_string())
}

struct ExactVec<T>(usize, std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> de::DeserializeSeed<'de> for ExactVec<T> {
    type Value = Vec<T>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for ExactVec<T> {
    type Value = Vec<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array")
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::with_capacity(self.0);
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(out)
    }
}

/// Refuses a JSON document in which any object has a key twice: a pass
/// over the text that keeps only the keys of the objects it is inside.
pub fn check_unique_keys(bytes: &[u8]) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de::DeserializeSeed::deserialize(Unique, &mut de)
        .and_then(|()| de.end())
        .map_err(|e| e.to_string())
}

/// [`check_unique_keys`]' visitor: accepts any value, refuses a repeated key.
struct Unique;

impl<'de> de::DeserializeSeed<'de> for Unique {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Unique)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value_seed(Unique)?;
            if let Some(key) = seen.replace(key) {
                return Err(duplicate(&key));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_found_at_any_depth() {
        assert_eq!(
            check_unique_keys(br#"{"a":[{"b":1,"c":{"d":null}}],"e":"x"}"#),
            Ok(())
        );
        for doc in [
            r#"{"a":1,"a":2}"#,
            r#"{"rules":[{"id":1},{"id":2,"ports":"1","ports":"2"}]}"#,
            r#"[[{"x":{"y":true,"y":false}}]]"#,
        ] {
            let err = check_unique_keys(doc.as_bytes()).unwrap_err();
            assert!(err.contains("duplicate key"), "{doc}: {err}");
        }
        assert!(check_unique_keys(b"{\"a\":1} x").is_err(), "trailing text");
    }
}
