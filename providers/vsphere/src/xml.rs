//! XML for vSphere Web Services: a namespace-aware reader walk (quick-xml `NsReader`) that turns a
//! SOAP response into a small tree of [`Node`]s keyed by local name, each carrying its resolved
//! `xsi:type`; and the escaping used to build request envelopes.
//!
//! A tree rather than serde: property values (`<val>`) are polymorphic and typed only by
//! `xsi:type` (a `ManagedObjectReference` has its own `type` attribute too, which collides with
//! `xsi:type` under serde), so callers dispatch on [`Node::xsi_type`].

use std::fmt::Write as _;

use quick_xml::events::Event;
use quick_xml::name::{Namespace, ResolveResult};
use quick_xml::reader::NsReader;
use quick_xml::XmlVersion;

/// The XML Schema instance namespace (`xsi:type`).
const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// XML Schema built-in types vSphere uses as `xsi:type` (written with the `xsd:` prefix).
const XSD_TYPES: &[&str] = &[
    "string",
    "boolean",
    "byte",
    "short",
    "int",
    "long",
    "float",
    "double",
    "dateTime",
    "base64Binary",
    "anyURI",
];

/// Deeper documents are refused (vSphere responses nest a few dozen levels at most).
pub const MAX_DEPTH: usize = 256;

/// One element: local name, resolved `xsi:type` (local part), other attributes, text, children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// The local part of `xsi:type`, e.g. `ManagedObjectReference`, `string`, `ArrayOfString`.
    pub xsi_type: Option<String>,
    /// Attributes other than namespace declarations and `xsi:*`, by local name.
    pub attrs: Vec<(String, String)>,
    /// Concatenated character data directly inside this element.
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    /// The first child with this local name.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child with this local name.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Follows a path of child names.
    pub fn path(&self, path: &[&str]) -> Option<&Node> {
        path.iter().try_fold(self, |n, p| n.child(p))
    }

    /// The text of the child with this name.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// An attribute by local name.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Serialises this node back into request XML (schema order is the order it was read in),
    /// with `xsi:type` where it had one.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write_xml(&mut out);
        out
    }

    fn write_xml(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        if let Some(t) = &self.xsi_type {
            let prefix = if XSD_TYPES.contains(&t.as_str()) {
                "xsd:"
            } else {
                ""
            };
            let _ = write!(out, " xsi:type=\"{prefix}{}\"", escape(t));
        }
        for (k, v) in &self.attrs {
            let _ = write!(out, " {k}=\"{}\"", escape(v));
        }
        out.push('>');
        out.push_str(&escape(&self.text));
        for c in &self.children {
            c.write_xml(out);
        }
        let _ = write!(out, "</{}>", self.name);
    }

    /// This node as a managed object reference (`type` attribute + text).
    pub fn moref(&self) -> Option<MoRef> {
        Some(MoRef {
            kind: self.attr("type")?.to_owned(),
            value: self.text.trim().to_owned(),
        })
    }
}

/// A managed object reference, e.g. `VirtualMachine:vm-42`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// The reference as a request element named `tag`.
    pub fn xml(&self, tag: &str) -> String {
        format!(
            "<{tag} type=\"{}\">{}</{tag}>",
            escape(&self.kind),
            escape(&self.value)
        )
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed XML at byte {position}: {reason}")]
pub struct XmlError {
    pub position: u64,
    pub reason: String,
}

fn local(qname: &str) -> String {
    match qname.split_once(':') {
        Some((_, l)) => l.to_owned(),
        None => qname.to_owned(),
    }
}

/// Whether `name` is a plausible XML name (quick-xml is lenient; vSphere names are plain).
fn valid_name(name: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    match name.split_once(':') {
        Some((prefix, local)) => part(prefix) && part(local),
        None => part(name),
    }
}

fn entity(name: &str) -> Option<char> {
    Some(match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => return None,
    })
}

/// Parses a whole document into its root element.
pub fn parse(doc: &str) -> Result<Node, XmlError> {
    let mut reader = NsReader::from_str(doc);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let err = |reader: &NsReader<&[u8]>, reason: String| XmlError {
        position: reader.buffer_position(),
        reason,
    };
    loop {
        let event = reader
            .read_event()
            .map_err(|e| err(&reader, e.to_string()))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(err(&reader, format!("nested deeper than {MAX_DEPTH}")));
                }
                let qname = e.name().into_inner();
                if !valid_name(qname) {
                    return Err(err(&reader, format!("invalid element name {qname:?}")));
                }
                let mut node = Node {
                    name: local(qname),
                    ..Node::default()
                };
                // For an Empty element, bindings it declares are not in the resolver yet: resolve
                // with its own declarations pushed.
                let is_empty = matches!(event, Event::Empty(_));
                if is_empty {
                    reader
                        .resolver_mut()
                        .push(e)
                        .map_err(|x| err(&reader, x.to_string()))?;
                }
                for attr in e.attributes() {
                    let attr = attr.map_err(|x| err(&reader, x.to_string()))?;
                    let key = attr.key;
                    let raw = key.into_inner();
                    if !valid_name(raw) {
                        return Err(err(&reader, format!("invalid attribute name {raw:?}")));
                    }
                    if raw == "xmlns" || raw.starts_with("xmlns:") {
                        continue;
                    }
                    let value = attr
                        .normalized_value(XmlVersion::Implicit1_0)
                        .map_err(|x| err(&reader, x.to_string()))?
                        .into_owned();
                    let (ns, name) = reader.resolver().resolve_attribute(key);
                    match ns {
                        ResolveResult::Bound(Namespace(ns))
                            if ns == XSI && name.into_inner() == "type" =>
                        {
                            node.xsi_type = Some(local(&value));
                        }
                        // Unqualified attributes only (a moref's `type`): vSphere puts none
                        // in other namespaces, and keeping them would lose their namespace.
                        ResolveResult::Unbound => {
                            node.attrs.push((name.into_inner().to_owned(), value))
                        }
                        _ => {}
                    }
                }
                if is_empty {
                    reader.resolver_mut().pop();
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => {
                            root = Some(node);
                            break;
                        }
                    }
                } else {
                    stack.push(node);
                }
            }
            Event::End(_) => {
                let node = stack
                    .pop()
                    .ok_or_else(|| err(&reader, "unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => {
                        root = Some(node);
                        break;
                    }
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.xml10_content());
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t);
                }
            }
            Event::GeneralRef(r) => {
                let c = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .map_err(|x| err(&reader, x.to_string()))?
                } else {
                    entity(&r)
                };
                let c = c.ok_or_else(|| err(&reader, format!("unknown entity &{};", &*r)))?;
                if let Some(top) = stack.last_mut() {
                    top.text.push(c);
                }
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    // Deep trees are dropped iteratively below MAX_DEPTH anyway; nothing else to free.
    root.ok_or_else(|| XmlError {
        position: reader.buffer_position(),
        reason: "no root element (empty or truncated document)".into(),
    })
}

/// Escapes text or an attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 cannot carry most control characters, even escaped: send them as spaces.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// `<tag>escaped text</tag>`.
pub fn elem(tag: &str, text: &str) -> String {
    let mut s = String::new();
    let _ = write!(s, "<{tag}>{}</{tag}>", escape(text));
    s
}

/// Wraps a request body in a SOAP envelope with the vim25 namespace as default.
pub fn envelope(body: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\
<soapenv:Body xmlns=\"urn:vim25\">{body}</soapenv:Body></soapenv:Envelope>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsi_type_is_resolved_by_namespace_and_moref_type_kept() {
        let doc = r#"<a xmlns:x="http://www.w3.org/2001/XMLSchema-instance" xmlns:q="urn:other">
            <val x:type="ManagedObjectReference" type="Folder">group-d1</val>
            <val q:type="notxsi">t&amp;x&#65;<![CDATA[<c>]]></val>
            <e x:type="xsd:string"/></a>"#;
        let n = parse(doc).expect("parses");
        let vals: Vec<&Node> = n.children_named("val").collect();
        assert_eq!(vals[0].xsi_type.as_deref(), Some("ManagedObjectReference"));
        assert_eq!(
            vals[0].moref(),
            Some(MoRef::new("Folder", "group-d1")),
            "{vals:?}"
        );
        assert_eq!(vals[1].xsi_type, None);
        assert_eq!(vals[1].text, "t&xA<c>");
        assert_eq!(
            n.child("e").and_then(|e| e.xsi_type.as_deref()),
            Some("string")
        );
    }

    #[test]
    fn namespaced_attributes_other_than_xsi_are_dropped() {
        let n = parse(
            r#"<v xmlns:a="urn:a" xmlns:b="urn:b" a:type="x" b:type="y" type="Folder">f</v>"#,
        )
        .expect("parses");
        assert_eq!(n.attrs, vec![("type".to_owned(), "Folder".to_owned())]);
        assert!(parse(&n.to_xml()).is_ok());
    }

    #[test]
    fn refuses_garbage_and_depth() {
        assert!(parse("").is_err());
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("<a>&nope;</a>").is_err());
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn to_xml_round_trips() {
        let doc = r#"<d xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="VirtualE1000"><key>4000</key><v xsi:type="xsd:int">3</v><n type="Network">network-7</n><t>a&amp;b</t></d>"#;
        let n = parse(doc).expect("parses");
        let again = parse(&format!(
            "<w xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"x\">{}</w>",
            n.to_xml()
        ))
        .expect("re-parses");
        assert_eq!(again.children[0], n);
        assert!(n.to_xml().contains("xsi:type=\"xsd:int\""));
    }

    #[test]
    fn escape_round_trips() {
        let s = "a<b>&\"c'\u{1}";
        let n = parse(&format!("<x>{}</x>", escape(s))).expect("parses");
        assert_eq!(n.text, "a<b>&\"c' ");
    }
}
