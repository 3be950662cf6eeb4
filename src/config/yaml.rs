//! A YAML tree that remembers where every node came from.
//!
//! Built from `yaml-rust2`'s event parser so that every scalar, sequence,
//! mapping and mapping key carries its line and column; later stages
//! (interpolation, merging, validation) report errors at those locations.
//! Scalars are kept as text with their style: a plain scalar's type (null,
//! bool, number) is decided only when a typed value is read, after
//! interpolation, so `port: ${PORT:-8080}` becomes a number.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in the source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Loc {
    pub line: usize,
    pub col: usize,
}

impl Loc {
    fn from_marker(m: Marker) -> Self {
        Loc {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

/// One node of the tree.
#[derive(Clone, Debug)]
pub struct Node {
    pub value: Value,
    pub loc: Loc,
}

#[derive(Clone, Debug)]
pub enum Value {
    /// Scalar text; `plain` is false for quoted and block scalars, which are
    /// always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

/// A mapping key and where it was written.
#[derive(Clone, Debug)]
pub struct Key {
    pub name: String,
    pub loc: Loc,
}

impl Node {
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The value under `key` when this node is a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short description of the node's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar { .. } if self.is_null() => "null",
            Value::Scalar { text, plain } => {
                if *plain && scalar_bool(text).is_some() {
                    "a boolean"
                } else if *plain && text.parse::<f64>().is_ok() {
                    "a number"
                } else {
                    "a string"
                }
            }
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// YAML 1.2 core-schema booleans.
pub fn scalar_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// A syntax error with its location.
#[derive(Debug)]
pub struct SyntaxError {
    pub loc: Loc,
    pub message: String,
}

enum Frame {
    Seq {
        items: Vec<Node>,
        loc: Loc,
        anchor: usize,
    },
    Map {
        entries: Vec<(Key, Node)>,
        /// Key name → index in `entries`, to find duplicates in O(1).
        seen: HashMap<String, usize>,
        pending: Option<Key>,
        loc: Loc,
        anchor: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    error: Option<SyntaxError>,
    documents: usize,
}

impl Builder {
    fn push_node(&mut self, node: Node, anchor: usize) {
        if self.error.is_some() {
            return;
        }
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                seen,
                pending,
                ..
            }) => match pending.take() {
                None => {
                    let name = match node.value {
                        Value::Scalar { text, .. } => text,
                        _ => {
                            self.error = Some(SyntaxError {
                                loc: node.loc,
                                message:
                                    "a mapping key must be a plain string, not a list or mapping"
                                        .into(),
                            });
                            return;
                        }
                    };
                    if let Some((first, _)) = seen.get(&name).map(|&i| &entries[i]) {
                        self.error = Some(SyntaxError {
                            loc: node.loc,
                            message: format!(
                                "duplicate key `{name}` (first defined at line {}); remove one of them",
                                first.loc.line
                            ),
                        });
                        return;
                    }
                    *pending = Some(Key {
                        name,
                        loc: node.loc,
                    });
                }
                Some(key) => {
                    seen.insert(key.name.clone(), entries.len());
                    entries.push((key, node));
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let loc = Loc::from_marker(mark);
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.error = Some(SyntaxError {
                        loc,
                        message: "more than one YAML document (`---`) in the file; nanokit.yml holds exactly one".into(),
                    });
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = style == TScalarStyle::Plain;
                self.push_node(
                    Node {
                        value: Value::Scalar { text, plain },
                        loc,
                    },
                    anchor,
                );
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(node) => self.push_node(node, 0),
                None => {
                    self.error = Some(SyntaxError {
                        loc,
                        message: "alias refers to an unknown anchor".into(),
                    })
                }
            },
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq {
                items: Vec::new(),
                loc,
                anchor,
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map {
                entries: Vec::new(),
                seen: HashMap::new(),
                pending: None,
                loc,
                anchor,
            }),
            Event::SequenceEnd => {
                if let Some(Frame::Seq { items, loc, anchor }) = self.stack.pop() {
                    self.push_node(
                        Node {
                            value: Value::Seq(items),
                            loc,
                        },
                        anchor,
                    );
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    entries,
                    loc,
                    anchor,
                    ..
                }) = self.stack.pop()
                {
                    match apply_merge_keys(entries) {
                        Ok(entries) => self.push_node(
                            Node {
                                value: Value::Map(entries),
                                loc,
                            },
                            anchor,
                        ),
                        Err(e) => self.error = Some(e),
                    }
                }
            }
            _ => {}
        }
    }
}

/// Applies YAML merge keys (`<<: *defaults` or `<<: [*a, *b]`): entries of
/// the merged mappings are added unless the mapping already has the key.
fn apply_merge_keys(entries: Vec<(Key, Node)>) -> Result<Vec<(Key, Node)>, SyntaxError> {
    if !entries.iter().any(|(k, _)| k.name == "<<") {
        return Ok(entries);
    }
    let mut own: Vec<(Key, Node)> = Vec::new();
    let mut merged: Vec<Node> = Vec::new();
    for (k, v) in entries {
        if k.name == "<<" {
            match v.value {
                Value::Map(_) => merged.push(v),
                Value::Seq(items) => merged.extend(items),
                _ => {
                    return Err(SyntaxError {
                        loc: v.loc,
                        message: "merge key `<<` needs a mapping or a list of mappings".into(),
                    })
                }
            }
        } else {
            own.push((k, v));
        }
    }
    for m in merged {
        match m.value {
            Value::Map(items) => {
                for (k, v) in items {
                    if !own.iter().any(|(o, _)| o.name == k.name) {
                        own.push((k, v));
                    }
                }
            }
            _ => {
                return Err(SyntaxError {
                    loc: m.loc,
                    message: "merge key `<<` needs a mapping or a list of mappings".into(),
                })
            }
        }
    }
    Ok(own)
}

/// Parses one YAML document. An empty document is an empty mapping.
pub fn parse(src: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(src);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(SyntaxError {
            loc: Loc::from_marker(*e.marker()),
            message: format!("YAML syntax error: {}", e.info()),
        });
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok(builder.root.unwrap_or(Node {
        value: Value::Map(Vec::new()),
        loc: Loc { line: 1, col: 1 },
    }))
}

/// Deep-merges `over` onto `base`: mappings merge key by key, everything else
/// (scalars, lists) is replaced by `over`.
pub fn deep_merge(base: Node, over: Node) -> Node {
    match (base.value, over.value) {
        (Value::Map(mut b), Value::Map(o)) => {
            for (k, v) in o {
                if let Some(pos) = b.iter().position(|(bk, _)| bk.name == k.name) {
                    let (_, old) = b.remove(pos);
                    b.insert(pos, (k, deep_merge(old, v)));
                } else {
                    b.push((k, v));
                }
            }
            Node {
                value: Value::Map(b),
                loc: over.loc,
            }
        }
        (_, value) => Node {
            value,
            loc: over.loc,
        },
    }
}
