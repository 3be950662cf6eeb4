//! A YAML tree that remembers where every node came from.
//!
//! Built from `yaml-rust2`'s event parser so that every scalar, sequence,
//! mapping and mapping key carries its line and column; later stages
//! (interpolation, merging, validation) report errors at those locations.
//! Scalars are kept as text with their style: a plain scalar's type (null,
//! bool, number) is decided only when a typed value is read, after
//! interpolation, so `port: ${PORT:-8080}` becomes a number.
//!
//! Hostile input cannot take the process down: the file size, the nesting
//! depth (also through aliases), the number of aliases and the values and
//! text that anchors and aliases copy are capped (the `MAX_*` constants, as
//! serde_yaml and libyaml-based loaders cap alias expansion), each breach an
//! error at the line and column where it happens; nothing here recurses
//! deeper than [`MAX_DEPTH`].

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in the source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
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

/// The largest nanokit.yml (and `.env`) read, in bytes.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// The deepest nesting of mappings and lists, counting the top level, also
/// through aliases (a real nanokit.yml needs about 7).
pub const MAX_DEPTH: usize = 64;
/// The most values (scalars, lists, mappings) the document may hold,
/// counting each copy an anchor or an alias makes.
pub const MAX_NODES: usize = 200_000;
/// The most aliases (`*name`) in one document.
pub const MAX_ALIASES: usize = 10_000;
/// The most text (scalars and keys) anchors and aliases may copy in total.
pub const MAX_COPIED_BYTES: usize = 8 << 20;

/// A subtree's size, kept for every anchor so an alias knows what it costs
/// before it copies anything.
#[derive(Clone, Copy, Default)]
struct Size {
    /// Levels of nesting: 0 for a scalar, 1 + the deepest child for a list
    /// or mapping.
    height: usize,
    nodes: usize,
    bytes: usize,
}

impl Size {
    fn add_child(&mut self, child: Size) {
        self.height = self.height.max(child.height + 1);
        self.nodes += child.nodes;
        self.bytes += child.bytes;
    }
}

enum Frame {
    Seq {
        items: Vec<Node>,
        loc: Loc,
        anchor: usize,
        size: Size,
    },
    Map {
        entries: Vec<(Key, Node)>,
        /// Key name → index in `entries`, to find duplicates in O(1).
        seen: HashMap<String, usize>,
        pending: Option<Key>,
        loc: Loc,
        anchor: usize,
        size: Size,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Node, Size)>,
    root: Option<Node>,
    error: Option<SyntaxError>,
    documents: usize,
    /// Values materialised so far, copies included.
    nodes: usize,
    aliases: usize,
    copied_bytes: usize,
    /// Just past the input's last character: yaml-rust2 marks what ends
    /// at the end of the input on the line after the last.
    end: Loc,
}

impl Builder {
    fn fail(&mut self, loc: Loc, message: String) {
        if self.error.is_none() {
            self.error = Some(SyntaxError { loc, message });
        }
    }

    /// Spends `nodes` values and `bytes` of copied text; false (and the
    /// error set) when that breaks a limit.
    fn spend(&mut self, loc: Loc, nodes: usize, copied: usize) -> bool {
        self.nodes += nodes;
        self.copied_bytes += copied;
        if self.nodes > MAX_NODES {
            let message = if self.aliases == 0 && self.copied_bytes == 0 && self.anchors.is_empty()
            {
                format!("the file holds more than {MAX_NODES} values: a nanokit.yml needs far fewer; split it")
            } else {
                format!(
                    "the file expands to more than {MAX_NODES} values (every copy an anchor `&name` or alias `*name` makes counts): \
                     is this an alias bomb? Repeat less through aliases, or split the file"
                )
            };
            self.fail(loc, message);
            return false;
        }
        if self.copied_bytes > MAX_COPIED_BYTES {
            self.fail(
                loc,
                format!(
                    "anchors and aliases copy more than {} MiB of text: is this an alias bomb? Repeat less through aliases",
                    MAX_COPIED_BYTES >> 20
                ),
            );
            return false;
        }
        true
    }

    fn open(&mut self, loc: Loc) -> bool {
        if self.stack.len() >= MAX_DEPTH {
            self.fail(
                loc,
                format!(
                    "mappings and lists are nested more than {MAX_DEPTH} levels deep here: nanokit.yml needs far fewer; flatten the file"
                ),
            );
            return false;
        }
        self.spend(loc, 1, 0)
    }

    fn push_node(&mut self, node: Node, anchor: usize, size: Size) {
        if self.error.is_some() {
            return;
        }
        if anchor > 0 {
            // The copy kept for later aliases is paid for like an alias.
            if !self.spend(node.loc, size.nodes, size.bytes) {
                return;
            }
            self.anchors.insert(anchor, (node.clone(), size));
        }
        let frame_size = match self.stack.last_mut() {
            None => {
                self.root = Some(node);
                return;
            }
            Some(Frame::Seq { size, .. }) | Some(Frame::Map { size, .. }) => size,
        };
        frame_size.add_child(size);
        match self.stack.last_mut() {
            None => {}
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

    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let mut loc = Loc::from_marker(mark);
        if loc.line > self.end.line {
            loc = self.end;
        }
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
            Event::Scalar(text, style, anchor, _tag) => self.on_scalar(text, style, anchor, loc),
            Event::Alias(id) => self.on_alias(id, loc),
            // `open` refuses a level past the limit (the error is set, and
            // the event falls through to `_`).
            Event::SequenceStart(anchor, _) if self.open(loc) => self.stack.push(Frame::Seq {
                items: Vec::new(),
                loc,
                anchor,
                size: Size {
                    height: 1,
                    nodes: 1,
                    bytes: 0,
                },
            }),
            Event::MappingStart(anchor, _) if self.open(loc) => self.stack.push(Frame::Map {
                entries: Vec::new(),
                seen: HashMap::new(),
                pending: None,
                loc,
                anchor,
                size: Size {
                    height: 1,
                    nodes: 1,
                    bytes: 0,
                },
            }),
            Event::SequenceEnd => self.end_seq(),
            Event::MappingEnd => self.end_map(),
            _ => {}
        }
    }

    fn on_scalar(&mut self, text: String, style: TScalarStyle, anchor: usize, loc: Loc) {
        if !self.spend(loc, 1, 0) {
            return;
        }
        let plain = style == TScalarStyle::Plain;
        let size = Size {
            height: 0,
            nodes: 1,
            bytes: text.len(),
        };
        self.push_node(
            Node {
                value: Value::Scalar { text, plain },
                loc,
            },
            anchor,
            size,
        );
    }

    /// An alias: a copy of its anchor's node, made once the copy is known
    /// to stay within the limits.
    fn on_alias(&mut self, id: usize, loc: Loc) {
        let Some(size) = self.anchors.get(&id).map(|(_, s)| *s) else {
            self.fail(loc, "alias refers to an unknown anchor".into());
            return;
        };
        self.aliases += 1;
        if self.aliases > MAX_ALIASES {
            self.fail(
                loc,
                format!("more than {MAX_ALIASES} aliases (`*name`) in the file: is this an alias bomb? Use fewer aliases"),
            );
            return;
        }
        if self.stack.len() + size.height > MAX_DEPTH {
            self.fail(
                loc,
                format!(
                    "this alias nests mappings and lists more than {MAX_DEPTH} levels deep: nanokit.yml needs far fewer; flatten the file"
                ),
            );
            return;
        }
        // Checked before the copy is made.
        if !self.spend(loc, size.nodes, size.bytes) {
            return;
        }
        let node = self.anchors[&id].0.clone();
        self.push_node(node, 0, size);
    }

    fn end_seq(&mut self) {
        if let Some(Frame::Seq {
            items,
            loc,
            anchor,
            size,
        }) = self.stack.pop()
        {
            self.push_node(
                Node {
                    value: Value::Seq(items),
                    loc,
                },
                anchor,
                size,
            );
        }
    }

    /// A mapping's end: its merge keys applied, it becomes a node.
    fn end_map(&mut self) {
        if let Some(Frame::Map {
            entries,
            loc,
            anchor,
            size,
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
                    size,
                ),
                Err(e) => self.error = Some(e),
            }
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
    let mut names: std::collections::HashSet<String> =
        own.iter().map(|(k, _)| k.name.clone()).collect();
    for m in merged {
        match m.value {
            Value::Map(items) => {
                for (k, v) in items {
                    if names.insert(k.name.clone()) {
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

/// Where byte `offset` of `src` is (1-based line and column in
/// characters), with YAML's line breaks: `\n`, `\r\n` and a lone `\r`.
pub fn loc_of_offset(src: &[u8], offset: usize) -> Loc {
    let before = &src[..offset.min(src.len())];
    let (mut breaks, mut line_start) = (0, 0);
    for (i, &b) in before.iter().enumerate() {
        if b == b'\r' || (b == b'\n' && (i == 0 || before[i - 1] != b'\r')) {
            breaks += 1;
        }
        if b == b'\r' || b == b'\n' {
            line_start = i + 1;
        }
    }
    let col = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    Loc {
        line: breaks + 1,
        col,
    }
}

/// Parses one YAML document. An empty document is an empty mapping.
///
/// The limits above hold whatever the input: the file is refused past
/// [`MAX_FILE_BYTES`], parsing stops at the first event that breaks a limit
/// (the parser is driven event by event, without recursion), and no tree
/// deeper than [`MAX_DEPTH`] is ever built, so the recursive stages after
/// this one (merge, interpolation, validation, `Drop`) stay shallow.
pub fn parse(src: &str) -> Result<Node, SyntaxError> {
    parse_unclamped(src).map_err(|mut e| {
        e.loc = clamp(src, e.loc);
        e
    })
}

/// `loc`, moved back inside `src` (yaml-rust2 reports an error at the end
/// of the input on the line after the last).
fn clamp(src: &str, loc: Loc) -> Loc {
    let end = end_of(src);
    if loc.line > end.line {
        end
    } else {
        loc
    }
}

/// The location just past the last character of `src`.
fn end_of(src: &str) -> Loc {
    loc_of_offset(src.as_bytes(), src.len())
}

fn parse_unclamped(src: &str) -> Result<Node, SyntaxError> {
    if src.len() > MAX_FILE_BYTES {
        return Err(SyntaxError {
            loc: loc_of_offset(src.as_bytes(), MAX_FILE_BYTES),
            message: format!(
                "the file is larger than {} MiB, where nanokit stops reading: a nanokit.yml is a few KiB",
                MAX_FILE_BYTES >> 20
            ),
        });
    }
    let mut builder = Builder {
        end: end_of(src),
        ..Builder::default()
    };
    let mut parser = Parser::new_from_str(src);
    loop {
        let (ev, mark) = parser.next_token().map_err(|e| SyntaxError {
            loc: Loc::from_marker(*e.marker()),
            message: format!("YAML syntax error: {}", e.info()),
        })?;
        if ev == Event::StreamEnd {
            break;
        }
        builder.on_event(ev, mark);
        if let Some(e) = builder.error.take() {
            return Err(e);
        }
    }
    Ok(builder.root.take().unwrap_or(Node {
        value: Value::Map(Vec::new()),
        loc: Loc { line: 1, col: 1 },
    }))
}

/// Deep-merges `over` onto `base`: mappings merge key by key, everything else
/// (scalars, lists) is replaced by `over`.
pub fn deep_merge(base: Node, over: Node) -> Node {
    match (base.value, over.value) {
        (Value::Map(mut b), Value::Map(o)) => {
            let mut index: HashMap<String, usize> = b
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.name.clone(), i))
                .collect();
            for (k, v) in o {
                if let Some(&pos) = index.get(&k.name) {
                    let old = std::mem::replace(
                        &mut b[pos].1,
                        Node {
                            value: Value::Seq(Vec::new()),
                            loc: Loc::default(),
                        },
                    );
                    b[pos] = (k, deep_merge(old, v));
                } else {
                    index.insert(k.name.clone(), b.len());
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

/// Values in `node`'s tree, itself included.
pub fn count_nodes(node: &Node) -> usize {
    1 + match &node.value {
        Value::Scalar { .. } => 0,
        Value::Seq(items) => items.iter().map(count_nodes).sum(),
        Value::Map(entries) => entries.iter().map(|(_, v)| 1 + count_nodes(v)).sum(),
    }
}
