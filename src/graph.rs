//! The dependency graph of a configuration (petgraph): unknown dependencies
//! and cycles are errors naming the services; layers for display; a start
//! order and its reverse for teardown.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::config::{Config, Loc};
use crate::error::ErrorCode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GraphError {
    #[error("{}: service `{service}` depends on `{dependency}`, which is not a service in this file; {hint}", at(.file, .loc))]
    UnknownDependency {
        file: PathBuf,
        loc: Loc,
        service: String,
        dependency: String,
        hint: String,
    },
    #[error("{}: dependency cycle {}; remove one of these `depends_on` entries", at(.file, .loc), .path.join(" → "))]
    Cycle {
        file: PathBuf,
        loc: Loc,
        /// The cycle, first service repeated at the end.
        path: Vec<String>,
    },
}

fn at(file: &std::path::Path, loc: &Loc) -> String {
    format!("{}:{}:{}", file.display(), loc.line, loc.col)
}

impl ErrorCode for GraphError {
    fn code(&self) -> &'static str {
        match self {
            GraphError::UnknownDependency { .. } => "ENKDEP",
            GraphError::Cycle { .. } => "ENKCYCLE",
        }
    }
}

/// A validated DAG of services.
#[derive(Debug, Clone)]
pub struct Dag {
    graph: DiGraph<String, ()>,
    index: HashMap<String, NodeIndex>,
    /// Topological order: dependencies first; ties by name.
    order: Vec<String>,
}

impl Dag {
    /// Builds the graph from `(service, dependencies)` pairs, checking
    /// nothing (used for state, whose recorded edges may name services that
    /// are gone). Edges to unknown names are dropped; cycles are broken
    /// arbitrarily.
    pub fn from_edges<'a>(edges: impl IntoIterator<Item = (&'a str, Vec<&'a str>)>) -> Dag {
        let edges: BTreeMap<&str, Vec<&str>> = edges.into_iter().collect();
        let mut graph = DiGraph::new();
        let mut index = HashMap::new();
        for name in edges.keys() {
            index.insert(name.to_string(), graph.add_node(name.to_string()));
        }
        for (name, deps) in &edges {
            for d in deps {
                if let Some(&di) = index.get(*d) {
                    graph.add_edge(di, index[*name], ());
                }
            }
        }
        let order = kahn(&graph);
        Dag {
            graph,
            index,
            order,
        }
    }

    /// Builds and validates the graph of `config`.
    pub fn build(config: &Config) -> Result<Dag, GraphError> {
        for svc in config.services.values() {
            for d in &svc.depends_on {
                if !config.services.contains_key(&d.name) {
                    let best = config
                        .services
                        .keys()
                        .map(|k| (strsim::jaro_winkler(k, &d.name), k))
                        .filter(|(s, _)| *s > 0.8)
                        .fold(None::<(f64, &String)>, |a, b| match a {
                            Some(x) if x.0 >= b.0 => Some(x),
                            _ => Some(b),
                        });
                    let hint = match best {
                        Some((_, k)) => format!("did you mean `{k}`?"),
                        None => format!(
                            "declare `{}` under `services` or remove it from `depends_on`",
                            d.name
                        ),
                    };
                    return Err(GraphError::UnknownDependency {
                        file: config.file.clone(),
                        loc: d.loc,
                        service: svc.name.clone(),
                        dependency: d.name.clone(),
                        hint,
                    });
                }
            }
        }
        if let Some(path) = find_cycle(config) {
            let loc = config.services[&path[0]]
                .depends_on
                .iter()
                .find(|d| d.name == path[1])
                .map_or(config.services[&path[0]].loc, |d| d.loc);
            return Err(GraphError::Cycle {
                file: config.file.clone(),
                loc,
                path,
            });
        }
        Ok(Dag::from_edges(
            config
                .services
                .values()
                .map(|s| (s.name.as_str(), s.dep_names().collect())),
        ))
    }

    /// Services, dependencies first.
    pub fn order(&self) -> &[String] {
        &self.order
    }

    /// Services, dependents first (teardown).
    pub fn reverse_order(&self) -> Vec<String> {
        self.order.iter().rev().cloned().collect()
    }

    /// Direct dependencies of `name`.
    pub fn dependencies(&self, name: &str) -> Vec<String> {
        self.neighbors(name, Direction::Incoming)
    }

    /// Direct dependents of `name`.
    pub fn dependents(&self, name: &str) -> Vec<String> {
        self.neighbors(name, Direction::Outgoing)
    }

    fn neighbors(&self, name: &str, dir: Direction) -> Vec<String> {
        let Some(&i) = self.index.get(name) else {
            return Vec::new();
        };
        let mut v: Vec<String> = self
            .graph
            .neighbors_directed(i, dir)
            .map(|n| self.graph[n].clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// `targets` and everything they depend on, transitively.
    pub fn closure(&self, targets: &[String]) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        let mut stack: Vec<String> = targets.to_vec();
        while let Some(n) = stack.pop() {
            if seen.insert(n.clone()) {
                stack.extend(self.dependencies(&n));
            }
        }
        self.order
            .iter()
            .filter(|n| seen.contains(*n))
            .cloned()
            .collect()
    }

    /// Layers: layer 0 has no dependencies; a service is one layer above its
    /// deepest dependency.
    pub fn layers(&self) -> Vec<Vec<String>> {
        let mut depth: HashMap<&str, usize> = HashMap::new();
        for n in &self.order {
            let d = self
                .dependencies(n)
                .iter()
                .map(|p| depth[p.as_str()] + 1)
                .max()
                .unwrap_or(0);
            depth.insert(n, d);
        }
        let max = depth.values().copied().max().map_or(0, |m| m + 1);
        let mut layers = vec![Vec::new(); max];
        for n in &self.order {
            layers[depth[n.as_str()]].push(n.clone());
        }
        layers
    }

    /// Graphviz DOT.
    pub fn to_dot(&self, name: &str) -> String {
        let mut s = format!("digraph {} {{\n  rankdir=LR;\n", quote(name));
        for n in &self.order {
            s.push_str(&format!("  {};\n", quote(n)));
        }
        for n in &self.order {
            for d in self.dependencies(n) {
                s.push_str(&format!("  {} -> {};\n", quote(n), quote(&d)));
            }
        }
        s.push_str("}\n");
        s
    }
}

impl fmt::Display for Dag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, layer) in self.layers().iter().enumerate() {
            writeln!(f, "layer {i}:")?;
            for n in layer {
                let deps = self.dependencies(n);
                if deps.is_empty() {
                    writeln!(f, "  {n}")?;
                } else {
                    writeln!(f, "  {n}  ← {}", deps.join(", "))?;
                }
            }
        }
        Ok(())
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Kahn's algorithm with a sorted ready set, so the order is stable.
fn kahn(graph: &DiGraph<String, ()>) -> Vec<String> {
    let mut indeg: HashMap<NodeIndex, usize> = graph
        .node_indices()
        .map(|n| (n, graph.neighbors_directed(n, Direction::Incoming).count()))
        .collect();
    let mut ready: std::collections::BTreeSet<(String, NodeIndex)> = indeg
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(n, _)| (graph[*n].clone(), *n))
        .collect();
    let mut out = Vec::with_capacity(graph.node_count());
    while let Some((name, n)) = ready.pop_first() {
        out.push(name);
        for m in graph.neighbors_directed(n, Direction::Outgoing) {
            let d = indeg.get_mut(&m).expect("node");
            *d -= 1;
            if *d == 0 {
                ready.insert((graph[m].clone(), m));
            }
        }
    }
    // Nodes left on a cycle (only possible from unchecked edges): append.
    if out.len() < graph.node_count() {
        let mut rest: Vec<String> = graph
            .node_indices()
            .filter(|n| indeg[n] > 0)
            .map(|n| graph[n].clone())
            .collect();
        rest.sort();
        out.extend(rest);
    }
    out
}

/// Depth-first search for a cycle, in name order so the reported path is
/// stable. Returns `[a, b, c, a]`.
fn find_cycle(config: &Config) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = config
        .services
        .keys()
        .map(|k| (k.as_str(), Mark::New))
        .collect();
    for start in config.services.keys() {
        if marks[start.as_str()] != Mark::New {
            continue;
        }
        // Iterative DFS: (node, next dependency index).
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        marks.insert(start, Mark::Active);
        while let Some((node, i)) = stack.last().copied() {
            let deps = &config.services[node].depends_on;
            if i < deps.len() {
                stack.last_mut().expect("frame").1 += 1;
                let d = deps[i].name.as_str();
                match marks.get(d).copied() {
                    Some(Mark::New) => {
                        marks.insert(d, Mark::Active);
                        stack.push((d, 0));
                    }
                    Some(Mark::Active) => {
                        let pos = stack.iter().position(|(n, _)| *n == d).expect("on stack");
                        let mut path: Vec<String> =
                            stack[pos..].iter().map(|(n, _)| n.to_string()).collect();
                        path.push(d.to_string());
                        return Some(path);
                    }
                    _ => {}
                }
            } else {
                marks.insert(node, Mark::Done);
                stack.pop();
            }
        }
    }
    None
}
