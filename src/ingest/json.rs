//! A JSON tree that borrows from the record it was parsed from: what the chat decoder reads
//! `chat.messages` into, instead of `serde_json::Value`.
//!
//! It is parsed and written exactly as `Value` (with `preserve_order`) is, so every message
//! is accepted or refused as before and the bytes the window store keeps are unchanged: the
//! same parser and number rules (the visitor mirrors `Value`'s), strings borrowed when they
//! hold no escape (copied when they do), and an object keeps its entries in document order:
//! a lookup takes a key's last value and writing puts each key once, where it first
//! appeared, which is what `Map::insert` does with a repeated key. What it saves is a map, a
//! hash and two `String`s per entry: a chat message of the DESIGN sample parsed into `Value`
//! took about 90 allocations, into this five.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Number, Value};

/// A JSON value, its strings borrowed from the input where they can be.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Object<'a>),
}

/// A JSON object's entries in document order, a repeated key included.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

/// `null`, for absent keys.
pub const NULL: &Json<'static> = &Json::Null;

/// Above this many entries, repeated keys are found with a hash map instead of by comparing
/// each key with those before it.
const SMALL: usize = 16;

/// The key by which `Value` (with serde_json's `raw_value`, which a dependency enables) reads
/// an object as the raw JSON text its one string holds.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

impl<'a> Json<'a> {
    /// Parses one JSON document as `serde_json::from_slice::<Value>` would. The record is
    /// checked for UTF-8 once, as a whole, so that the parser need not check each string
    /// again; one that is not UTF-8 takes `from_slice`, whose error says where.
    pub fn parse(bytes: &'a [u8]) -> serde_json::Result<Self> {
        match std::str::from_utf8(bytes) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(bytes),
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    /// The same value as a `serde_json::Value`.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("a JSON tree always converts")
    }

    /// The same value, owning its strings.
    pub fn into_owned(self) -> Json<'static> {
        match self {
            Json::Null => Json::Null,
            Json::Bool(b) => Json::Bool(b),
            Json::Number(n) => Json::Number(n),
            Json::String(s) => Json::String(Cow::Owned(s.into_owned())),
            Json::Array(a) => Json::Array(a.into_iter().map(Json::into_owned).collect()),
            Json::Object(o) => Json::Object(o.into_owned()),
        }
    }
}

impl<'a> Object<'a> {
    /// The value of `key`: its last one, when the key is repeated.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    /// The same object as a `serde_json::Value`.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("a JSON tree always converts")
    }

    /// Distinct keys.
    pub fn len(&self) -> usize {
        self.entries().count()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each key once, at its first place, with its last value: `Map`'s order and values.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Json<'a>)> + '_ {
        let last: Option<HashMap<&str, usize>> =
            (self.0.len() > SMALL).then(|| self.0.iter().enumerate().map(|(i, (k, _))| (k.as_ref(), i)).collect());
        let mut seen = std::collections::HashSet::new();
        self.0.iter().enumerate().filter_map(move |(i, (k, v))| match &last {
            None if self.0[..i].iter().any(|(p, _)| p == k) => None,
            None => Some((k.as_ref(), self.0[i..].iter().rev().find(|(p, _)| p == k).map_or(v, |(_, v)| v))),
            Some(last) => seen.insert(k.as_ref()).then(|| (k.as_ref(), &self.0[last[k.as_ref()]].1)),
        })
    }

    /// Every entry in document order, a repeated key each time.
    pub fn into_entries(self) -> impl Iterator<Item = (Cow<'a, str>, Json<'a>)> {
        self.0.into_iter()
    }

    pub fn into_owned(self) -> Object<'static> {
        Object(self.0.into_iter().map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned())).collect())
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => serializer.serialize_unit(),
            Json::Bool(b) => serializer.serialize_bool(*b),
            Json::Number(n) => n.serialize(serializer),
            Json::String(s) => serializer.serialize_str(s),
            Json::Array(a) => a.serialize(serializer),
            Json::Object(o) => o.serialize(serializer),
        }
    }
}

impl Serialize for Object<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.entries() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

/// `Value`'s visitor, borrowing strings.
struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Json::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_i128<E: de::Error>(self, n: i128) -> Result<Self::Value, E> {
        Number::deserialize(de::value::I128Deserializer::new(n)).map(Json::Number)
    }

    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_u128<E: de::Error>(self, n: u128) -> Result<Self::Value, E> {
        Number::deserialize(de::value::U128Deserializer::new(n)).map(Json::Number)
    }

    fn visit_f64<E>(self, n: f64) -> Result<Self::Value, E> {
        Ok(Number::from_f64(n).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(s)))
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        Json::deserialize(deserializer)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some(first) = map.next_key_seed(Str)? else { return Ok(Json::Object(Object::default())) };
        if first == RAW_VALUE_TOKEN {
            let text = map.next_value_seed(Str)?; // as `Value` does: the string is JSON text
            return serde_json::from_str::<Json>(&text).map(Json::into_owned).map_err(de::Error::custom);
        }
        let mut entries = vec![(first, map.next_value()?)];
        while let Some(key) = map.next_key_seed(Str)? {
            entries.push((key, map.next_value()?));
        }
        Ok(Json::Object(Object(entries)))
    }
}

/// A string, borrowed from the input when it holds no escape: keys, and `Value`'s raw token.
struct Str;

impl<'de> DeserializeSeed<'de> for Str {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Str {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Documents whose parse or bytes could tell a borrowed tree from `Value`.
    const DOCUMENTS: &[&str] = &[
        r#"{"a":1,"b":[true,false,null],"c":{"d":"e"}}"#,
        r#"{ "spaced" : [ 1 , 2 ] ,
            "nested": {"x": {"y": [ {}, [] ]}} }"#,
        r#"{"k":1,"other":2,"k":3}"#,
        r#"{"k":{"a":1},"k":{"b":2,"b":3}}"#,
        r#"{"esc":"tab\tquote\"slash\/ \u00e9 \ud83d\udc4b nul\u0000 del\u007f","\u006bey":"\u2028"}"#,
        r#"{"raw":"Chào 👋🏽 שלום <b>&</b>"}"#,
        r#"{"f":1.0,"g":1e5,"h":-0,"i":-0.0,"j":18446744073709551615,"k":18446744073709551616,"l":-9223372036854775809,"m":1.5e300,"n":0.1}"#,
        r#"{"$serde_json::private::RawValue":"[1, 2,{\"a\": 3}]"}"#,
        r#"[1,"two",{"three":3}]"#,
        r#""just a string""#,
        "12",
        "null",
    ];

    #[test]
    fn parses_and_writes_as_value_does() {
        let mut many = String::from("{");
        for i in 0..40 {
            many.push_str(&format!(r#""k{}":{i},"#, i % 25));
        }
        many.push_str(r#""last":true}"#);
        for doc in DOCUMENTS.iter().copied().chain([many.as_str()]) {
            let value: Value = serde_json::from_str(doc).unwrap();
            let json = Json::parse(doc.as_bytes()).unwrap();
            assert_eq!(serde_json::to_string(&json).unwrap(), serde_json::to_string(&value).unwrap(), "{doc}");
            assert_eq!(json.to_value(), value, "{doc}");
            assert_eq!(json.clone().into_owned(), json, "{doc}");
        }
    }

    #[test]
    fn lookups_take_the_last_value_and_borrow_plain_strings() {
        let doc = br#"{"k":1,"s":"plain","e":"a\nb","k":2}"#;
        let Json::Object(o) = Json::parse(doc).unwrap() else { panic!("an object") };
        assert_eq!(o.get("k"), Some(&Json::Number(2.into())));
        assert_eq!((o.len(), o.contains_key("e"), o.get("zz")), (3, true, None));
        assert!(matches!(o.get("s"), Some(Json::String(Cow::Borrowed("plain")))));
        assert!(matches!(o.get("e"), Some(Json::String(Cow::Owned(s))) if s == "a\nb"));
    }

    #[test]
    fn refuses_what_value_refuses_with_its_message() {
        for doc in ["", "{", r#"{"a":}"#, r#"{"a":1,}"#, "[1,]", r#"{"a":1e400}"#, r#"{"a":"\x"}"#, "{} x", r#"{"a":"\ud800"}"#] {
            let want = serde_json::from_slice::<Value>(doc.as_bytes()).unwrap_err().to_string();
            assert_eq!(Json::parse(doc.as_bytes()).unwrap_err().to_string(), want, "{doc}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        let want = serde_json::from_slice::<Value>(deep.as_bytes()).unwrap_err().to_string();
        assert_eq!(Json::parse(deep.as_bytes()).unwrap_err().to_string(), want);
        let bad_utf8 = b"{\"a\":\"\xff\"}";
        let want = serde_json::from_slice::<Value>(bad_utf8).unwrap_err().to_string();
        assert_eq!(Json::parse(bad_utf8).unwrap_err().to_string(), want);
    }
}
