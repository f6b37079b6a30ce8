//! JSON value to XML document (Teamcrop's XML bodies), and a well-formedness check for
//! custom dialects' XML templates. Writing and escaping are quick-xml's.
//!
//! Mapping: an object becomes one child element per key, in order; an array becomes one
//! `<item>` child per element; `null`, `{}` and `[]` become an empty element; strings,
//! numbers and booleans become escaped text.
//!
//! Names: a JSON key that is not a valid XML element name is made one by replacing every
//! character that may not appear in a name (space, `:`, `@`, ...) with `_`, and by prefixing
//! `_` when it does not start with a letter or `_` (`2fa` -> `_2fa`, `""` -> `_`). Keys that
//! differ only in such characters can thus give the same element name; their order in the
//! document still tells them apart.
//!
//! Text: characters XML 1.0 forbids even when escaped (most C0 controls, U+FFFE, U+FFFF)
//! are replaced by U+FFFD, so a stray control character cannot make the document unreadable.

use std::borrow::Cow;
use std::io;

use quick_xml::events::{BytesDecl, BytesText, Event};
use quick_xml::{Reader, Writer};
use serde_json::Value;

/// `<?xml version="1.0" encoding="UTF-8"?>` followed by `value` as element `root`.
pub(super) fn document(root: &str, value: &Value) -> Vec<u8> {
    let mut writer = Writer::new(Vec::new());
    // Writing into a Vec cannot fail.
    let written = writer
        .write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))
        .and_then(|()| write_value(&mut writer, &element_name(root), value));
    written.expect("writing XML into memory cannot fail");
    writer.into_inner()
}

fn write_value(w: &mut Writer<Vec<u8>>, name: &str, value: &Value) -> io::Result<()> {
    let element = w.create_element(name);
    match value {
        Value::Null => element.write_empty().map(drop),
        Value::Object(map) if map.is_empty() => element.write_empty().map(drop),
        Value::Array(items) if items.is_empty() => element.write_empty().map(drop),
        Value::Object(map) => {
            element.write_inner_content(|w| map.iter().try_for_each(|(k, v)| write_value(w, &element_name(k), v))).map(drop)
        }
        Value::Array(items) => element.write_inner_content(|w| items.iter().try_for_each(|v| write_value(w, "item", v))).map(drop),
        Value::String(s) => element.write_text_content(BytesText::new(&xml_text(s))).map(drop),
        Value::Bool(_) | Value::Number(_) => element.write_text_content(BytesText::new(&value.to_string())).map(drop),
    }
}

/// `name` made into a valid XML element name (see the module docs).
pub(super) fn element_name(name: &str) -> Cow<'_, str> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(is_name_start) && chars.all(is_name_char);
    if valid {
        return Cow::Borrowed(name);
    }
    let mut out: String = name.chars().map(|c| if is_name_char(c) { c } else { '_' }).collect();
    if !out.chars().next().is_some_and(is_name_start) {
        out.insert(0, '_');
    }
    Cow::Owned(out)
}

/// XML 1.0 (5th ed.) NameStartChar, without `:` (reserved for namespaces).
fn is_name_start(c: char) -> bool {
    matches!(c,
        'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}' | '\u{F8}'..='\u{2FF}'
        | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}' | '\u{200C}'..='\u{200D}' | '\u{2070}'..='\u{218F}'
        | '\u{2C00}'..='\u{2FEF}' | '\u{3001}'..='\u{D7FF}' | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}'
        | '\u{10000}'..='\u{EFFFF}')
}

/// XML 1.0 (5th ed.) NameChar, without `:`.
fn is_name_char(c: char) -> bool {
    is_name_start(c) || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

/// `s` with the characters XML 1.0 cannot carry replaced by U+FFFD.
fn xml_text(s: &str) -> Cow<'_, str> {
    let allowed = |c: char| !matches!(c, '\0'..='\u{8}' | '\u{B}' | '\u{C}' | '\u{E}'..='\u{1F}' | '\u{FFFE}' | '\u{FFFF}');
    if s.chars().all(allowed) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.chars().map(|c| if allowed(c) { c } else { '\u{FFFD}' }).collect())
    }
}

/// Checks that `text` is one well-formed XML document: parses, tags balance, exactly one
/// root element, nothing but whitespace, comments and processing instructions outside it.
pub(super) fn check_well_formed(text: &str) -> Result<(), String> {
    let mut reader = Reader::from_str(text);
    let (mut depth, mut roots) = (0usize, 0usize);
    loop {
        let event = reader.read_event().map_err(|e| format!("at byte {}: {e}", reader.error_position()))?;
        match event {
            Event::Start(_) | Event::Empty(_) if depth == 0 && roots == 1 => {
                return Err("more than one root element".into());
            }
            Event::Start(_) => (depth, roots) = (depth + 1, 1),
            Event::Empty(_) => roots = 1,
            Event::End(_) => depth -= 1, // quick-xml checks end names, so depth > 0 here
            Event::Text(t) if depth == 0 && !t.iter().all(u8::is_ascii_whitespace) => {
                return Err("text outside the root element".into());
            }
            Event::CData(_) | Event::GeneralRef(_) if depth == 0 => {
                return Err("text outside the root element".into());
            }
            Event::Eof if depth > 0 => return Err("document ends inside an element".into()),
            Event::Eof if roots == 0 => return Err("no root element".into()),
            Event::Eof => return Ok(()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(root: &str, v: Value) -> String {
        String::from_utf8(document(root, &v)).unwrap()
    }

    const DECL: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

    #[test]
    fn maps_objects_arrays_nulls_and_scalars() {
        let got = doc("order", json!({"a": 1, "b": {"c": true}, "list": [1, "x", null], "none": null, "e": [], "o": {}}));
        let want = "<order><a>1</a><b><c>true</c></b><list><item>1</item><item>x</item><item/></list>\
                    <none/><e/><o/></order>";
        assert_eq!(got, format!("{DECL}{want}"));
        assert!(check_well_formed(&got).is_ok());
    }

    #[test]
    fn escapes_text() {
        let got = doc("r", json!({"t": "a < b & c > \"d\" 'e'"}));
        assert_eq!(got, format!("{DECL}<r><t>a &lt; b &amp; c &gt; &quot;d&quot; &apos;e&apos;</t></r>"));
    }

    #[test]
    fn invalid_names_and_control_characters_do_not_break_the_document() {
        let got = doc("1 root", json!({"2fa": 1, "a b": 2, "x:y": 3, "": 4, "-k": 5, "ok.name-1": 6, "tên": 7, "bell": "\u{7}!"}));
        let want = "<_1_root><_2fa>1</_2fa><a_b>2</a_b><x_y>3</x_y><_>4</_><_-k>5</_-k><ok.name-1>6</ok.name-1>\
                    <tên>7</tên><bell>\u{FFFD}!</bell></_1_root>";
        assert_eq!(got, format!("{DECL}{want}"));
        assert!(check_well_formed(&got).is_ok());
    }

    #[test]
    fn well_formedness_check() {
        assert!(check_well_formed("<a><b/>x &amp; y</a>").is_ok());
        assert!(check_well_formed("<?xml version=\"1.0\"?>\n<a/>\n").is_ok());
        for (bad, why) in
            [("<a><b></a>", "at byte"), ("<a>", "ends inside"), ("<a/><b/>", "more than one root"), ("x<a/>", "outside"), ("", "no root")]
        {
            let err = check_well_formed(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
