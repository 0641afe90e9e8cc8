//! Per-event payload schemas: a CDDL document (RFC 8610) parsed once with cddl-cat, whose rule
//! `payload` an event's `data` must match, and — when it does not — the path of the failing
//! item inside `data` (`data.items[2].price: expected uint, got "12.5"`).
//!
//! cddl-cat answers a mismatch with what it expected and no path (`Mismatch(expected uint)`),
//! so the path is found afterwards, on the failure path only: walking the schema's tree and
//! the value side by side, checking each member against its own sub-schema (with cddl-cat,
//! so the verdicts agree) and descending into the first that fails. The walk sees through
//! rule references, map members with literal keys (`name: type`, `"name" => type`,
//! `1 => type`), map members with type keys (`* tstr => uint`), records (`[lat: float,
//! lon: float]`), vectors (`[* item]`) and choices of which only one has the value's shape
//! (map or array). Where it cannot tell which branch applies (a choice between two maps,
//! groups spliced into a map, generic rules) it names the deepest item it could, and says
//! what that item's schema expected.
//!
//! This module owns schema parsing and validation; which namespace and event a schema
//! applies to is [`crate::policy`]'s business.

use std::{fmt::Write as _, sync::Arc};

use cddl_cat::{
    context::BasicContext,
    ivt::{Literal, Node, PreludeType, RuleDef},
};
use ciborium::Value;

/// The rule of a schema document that payloads must match.
pub(crate) const SCHEMA_RULE: &str = "payload";

/// How deep the path search follows rule references and nesting (schemas are small; this
/// only stops recursive rules).
const MAX_DEPTH: usize = 32;

/// One parsed schema.
#[derive(Clone)]
pub(crate) struct Schema(Arc<BasicContext>);

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schema")
    }
}

/// Why a schema document was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SchemaError {
    /// Not CDDL that the validator understands.
    #[error(transparent)]
    Cddl(#[from] cddl_cat::ValidateError),
    /// No rule named [`SCHEMA_RULE`].
    #[error("no rule named `{SCHEMA_RULE}`")]
    NoPayloadRule,
}

/// Why a payload does not match its schema: the path of the failing part (rooted at `data`)
/// and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Mismatch {
    /// The payload is not CBOR at all.
    #[error("not CBOR: {0}")]
    NotCbor(String),
    /// The item at `path` is there but of another shape.
    #[error("{path}: expected {expected}, got {got}")]
    Expected {
        /// Where, rooted at `data`.
        path: String,
        /// The schema's side, in CDDL terms.
        expected: String,
        /// The value's side.
        got: String,
    },
    /// A required map key is absent at `path`.
    #[error("{path}: missing")]
    Missing {
        /// Where, rooted at `data`.
        path: String,
    },
    /// A map key the schema does not have, at `path`.
    #[error("{path}: not in the schema")]
    Unexpected {
        /// Where, rooted at `data`.
        path: String,
    },
    /// The validator refused for a reason that is not a data mismatch (an unsupported
    /// feature of the schema, say): its words.
    #[error("data: {0}")]
    Other(String),
}

impl Schema {
    /// Parses a CDDL document, which must have a rule named [`SCHEMA_RULE`].
    pub(crate) fn parse(text: &str) -> Result<Self, SchemaError> {
        let rules = cddl_cat::flatten::flatten_from_str(text)?;
        if !rules.contains_key(SCHEMA_RULE) {
            return Err(SchemaError::NoPayloadRule);
        }
        Ok(Schema(Arc::new(BasicContext::new(rules))))
    }

    /// Checks `data` (CBOR) against the rule `payload`; a mismatch names the failing path,
    /// rooted at `data`.
    pub(crate) fn validate(&self, data: &[u8]) -> Result<(), Mismatch> {
        let value: Value =
            ciborium::from_reader(data).map_err(|e| Mismatch::NotCbor(e.to_string()))?;
        let context = &*self.0;
        let rule = context
            .rules
            .get(SCHEMA_RULE)
            .ok_or_else(|| Mismatch::Other(format!("no rule {SCHEMA_RULE}")))?;
        match cddl_cat::validate_cbor(rule, &value, context) {
            Ok(()) => Ok(()),
            Err(e) => {
                let mut path = String::from("data");
                let found = self.locate(&rule.node, &value, &mut path, 0);
                Err(match found {
                    Some(Failure::Expected { expected, got }) => Mismatch::Expected {
                        path,
                        expected,
                        got,
                    },
                    Some(Failure::Missing) => Mismatch::Missing { path },
                    Some(Failure::Unexpected) => Mismatch::Unexpected { path },
                    // Not a data mismatch (an unsupported feature of the schema, say).
                    None => Mismatch::Other(e.to_string()),
                })
            }
        }
    }

    /// Whether `value` matches `node` alone.
    fn matches(&self, node: &Node, value: &Value) -> bool {
        self.matches_rule(&standalone(node), value)
    }

    fn matches_rule(&self, rule: &RuleDef, value: &Value) -> bool {
        cddl_cat::validate_cbor(rule, value, &*self.0).is_ok()
    }

    /// Follows rule references without generic arguments.
    fn resolve<'a>(&'a self, mut node: &'a Node) -> &'a Node {
        for _ in 0..MAX_DEPTH {
            match node {
                Node::Rule(rule) if rule.generic_args.is_empty() => {
                    match self.0.rules.get(&rule.name) {
                        Some(def) if def.generic_parms.is_empty() => node = &def.node,
                        _ => return node,
                    }
                }
                _ => return node,
            }
        }
        node
    }

    /// Where `value` (which does not match `node`) fails: appends the path below it to
    /// `path` and says what failed there.
    fn locate(
        &self,
        node: &Node,
        value: &Value,
        path: &mut String,
        depth: usize,
    ) -> Option<Failure> {
        let node = self.resolve(node);
        if depth >= MAX_DEPTH {
            return Some(mismatch(node, value));
        }
        match (node, value) {
            (Node::Map(map), Value::Map(entries)) => {
                let mut claimed = vec![false; entries.len()];
                let mut open = false;
                for member in &map.members {
                    let (kv, required) = match member {
                        Node::KeyValue(kv) => (kv, true),
                        Node::Occur(occur) => match &*occur.node {
                            Node::KeyValue(kv) => (kv, occur.limits().0 > 0),
                            _ => {
                                open = true;
                                continue;
                            }
                        },
                        _ => {
                            open = true;
                            continue;
                        }
                    };
                    if let Node::Literal(key) = &*kv.key {
                        match entries.iter().position(|(k, _)| literal_eq(key, k)) {
                            Some(at) => {
                                claimed[at] = true;
                                if !self.matches(&kv.value, &entries[at].1) {
                                    push_key(path, &entries[at].0);
                                    return self.locate(&kv.value, &entries[at].1, path, depth + 1);
                                }
                            }
                            None if required => {
                                push_literal_key(path, key);
                                return Some(Failure::Missing);
                            }
                            None => {}
                        }
                    } else {
                        // A member with a type key (`* tstr => uint`): the entries it covers.
                        open = true;
                        let (key_rule, value_rule) = (standalone(&kv.key), standalone(&kv.value));
                        for (at, (k, v)) in entries.iter().enumerate() {
                            if claimed[at] || !self.matches_rule(&key_rule, k) {
                                continue;
                            }
                            claimed[at] = true;
                            if !self.matches_rule(&value_rule, v) {
                                push_key(path, k);
                                return self.locate(&kv.value, v, path, depth + 1);
                            }
                        }
                    }
                }
                if !open {
                    if let Some(at) = claimed.iter().position(|c| !c) {
                        push_key(path, &entries[at].0);
                        return Some(Failure::Unexpected);
                    }
                }
                Some(mismatch(node, value))
            }
            (Node::Array(array), Value::Array(items)) => {
                let members: Vec<&Node> = array.members.iter().collect();
                match members.as_slice() {
                    // A vector: `[* item]`, `[+ item]`.
                    [Node::Occur(occur)] => {
                        let item = value_node(&occur.node);
                        let rule = standalone(item);
                        for (i, v) in items.iter().enumerate() {
                            if !self.matches_rule(&rule, v) {
                                let _ = write!(path, "[{i}]");
                                return self.locate(item, v, path, depth + 1);
                            }
                        }
                        Some(mismatch(node, value))
                    }
                    // A record: one item per member, in order.
                    record
                        if record.len() == items.len()
                            && record
                                .iter()
                                .all(|m| !matches!(m, Node::Occur(_) | Node::Group(_))) =>
                    {
                        for (i, (member, v)) in record.iter().zip(items).enumerate() {
                            let item = value_node(member);
                            if !self.matches(item, v) {
                                let _ = write!(path, "[{i}]");
                                return self.locate(item, v, path, depth + 1);
                            }
                        }
                        Some(mismatch(node, value))
                    }
                    // A record of another length.
                    record
                        if record
                            .iter()
                            .all(|m| !matches!(m, Node::Occur(_) | Node::Group(_))) =>
                    {
                        Some(Failure::Expected {
                            expected: format!("array of {}", items_count(record.len())),
                            got: describe(value),
                        })
                    }
                    _ => Some(mismatch(node, value)),
                }
            }
            (Node::Choice(choice), _) => {
                // Descend only when exactly one option has the value's shape.
                let shaped: Vec<&Node> = choice
                    .options
                    .iter()
                    .filter(|option| same_shape(self.resolve(option), value))
                    .collect();
                match shaped.as_slice() {
                    [only] if matches!(value, Value::Map(_) | Value::Array(_)) => {
                        self.locate(only, value, path, depth + 1)
                    }
                    _ => Some(mismatch(node, value)),
                }
            }
            _ => Some(mismatch(node, value)),
        }
    }
}

/// What failed at the located path.
enum Failure {
    /// The item is there but does not match: what its schema expected, what it is.
    Expected {
        /// The schema's side, in CDDL terms.
        expected: String,
        /// The value's side ([`describe`]).
        got: String,
    },
    /// A required map key is absent.
    Missing,
    /// A map key the schema does not have.
    Unexpected,
}

/// `node` as a rule of its own, to validate a part of the value against (a small clone: only
/// on the failure path).
fn standalone(node: &Node) -> RuleDef {
    RuleDef {
        generic_parms: Vec::new(),
        node: node.clone(),
    }
}

fn mismatch(node: &Node, value: &Value) -> Failure {
    Failure::Expected {
        expected: expected(node),
        got: describe(value),
    }
}

/// The value node of an array member or vector item (`lat: float` is `float`).
fn value_node(node: &Node) -> &Node {
    match node {
        Node::KeyValue(kv) => &kv.value,
        other => other,
    }
}

fn same_shape(node: &Node, value: &Value) -> bool {
    matches!(
        (node, value),
        (Node::Map(_), Value::Map(_)) | (Node::Array(_), Value::Array(_))
    )
}

fn literal_eq(literal: &Literal, key: &Value) -> bool {
    match (literal, key) {
        (Literal::Text(a), Value::Text(b)) => a == b,
        (Literal::Int(a), Value::Integer(b)) => *a == i128::from(*b),
        (Literal::Bool(a), Value::Bool(b)) => a == b,
        (Literal::Bytes(a), Value::Bytes(b)) => a == b,
        _ => false,
    }
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Appends a map key to `path`: `.name` for identifier-like text, `["any text"]` or `[7]`
/// otherwise.
fn push_key(path: &mut String, key: &Value) {
    match key {
        Value::Text(text) if is_identifier(text) => {
            let _ = write!(path, ".{text}");
        }
        other => {
            let _ = write!(path, "[{}]", describe(other));
        }
    }
}

fn push_literal_key(path: &mut String, key: &Literal) {
    match key {
        Literal::Text(text) if is_identifier(text) => {
            let _ = write!(path, ".{text}");
        }
        other => {
            let _ = write!(path, "[{other}]");
        }
    }
}

/// What `node` accepts, in CDDL terms.
fn expected(node: &Node) -> String {
    match node {
        Node::PreludeType(p) => match p {
            PreludeType::Any => "any",
            PreludeType::Nil => "nil",
            PreludeType::Bool => "bool",
            PreludeType::Int => "int",
            PreludeType::Uint => "uint",
            PreludeType::Nint => "nint",
            PreludeType::Float => "float",
            PreludeType::Tstr => "tstr",
            PreludeType::Bstr => "bstr",
        }
        .to_owned(),
        Node::Literal(literal) => literal.to_string(),
        Node::Choice(choice) => {
            let options: Vec<String> = choice.options.iter().take(8).map(expected).collect();
            let more = if choice.options.len() > 8 {
                " / …"
            } else {
                ""
            };
            format!("{}{more}", options.join(" / "))
        }
        Node::Rule(rule) => rule.name.clone(),
        Node::Map(_) => "map".to_owned(),
        Node::Array(_) => "array".to_owned(),
        Node::Range(range) => range.to_string(),
        Node::Control(_) => "a value within the schema's control operator".to_owned(),
        other => other.to_string(),
    }
}

/// A short description of a value: small scalars as they are (`"12.5"`, `-3`, `true`),
/// anything else by its CDDL type and size.
fn describe(value: &Value) -> String {
    match value {
        Value::Integer(i) => i128::from(*i).to_string(),
        Value::Float(f) => format!("{f:?}"),
        Value::Bool(b) => b.to_string(),
        Value::Null => "nil".to_owned(),
        Value::Text(text) if text.len() <= 24 => format!("{text:?}"),
        Value::Text(text) => format!("tstr of {} bytes", text.len()),
        Value::Bytes(bytes) => format!("bstr of {} bytes", bytes.len()),
        Value::Array(items) => format!("array of {}", items_count(items.len())),
        Value::Map(entries) => match entries.len() {
            1 => "map of 1 entry".to_owned(),
            n => format!("map of {n} entries"),
        },
        Value::Tag(tag, _) => format!("tag {tag}"),
        _ => "undefined".to_owned(),
    }
}

fn items_count(n: usize) -> String {
    match n {
        1 => "1 item".to_owned(),
        n => format!("{n} items"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::Value as V;

    fn cbor(value: &V) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    fn map(entries: &[(&str, V)]) -> V {
        V::Map(
            entries
                .iter()
                .map(|(k, v)| (V::Text((*k).into()), v.clone()))
                .collect(),
        )
    }

    fn text(s: &str) -> V {
        V::Text(s.into())
    }

    fn int(i: i64) -> V {
        V::Integer(i.into())
    }

    fn error(schema: &str, value: &V) -> String {
        Schema::parse(schema)
            .unwrap()
            .validate(&cbor(value))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn mismatches_name_the_failing_path() {
        let order = r#"
            payload = { id: uint, items: [* item], ? note: tstr }
            item = { sku: tstr, price: uint, ? tags: [* tstr] }
        "#;
        let good_item = map(&[("sku", text("a")), ("price", int(3))]);
        let ok = map(&[("id", int(1)), ("items", V::Array(vec![good_item.clone()]))]);
        assert_eq!(Schema::parse(order).unwrap().validate(&cbor(&ok)), Ok(()));
        let bad_price = map(&[
            ("id", int(1)),
            (
                "items",
                V::Array(vec![
                    good_item.clone(),
                    map(&[("sku", text("b")), ("price", text("12.5"))]),
                ]),
            ),
        ]);
        assert_eq!(
            error(order, &bad_price),
            r#"data.items[1].price: expected uint, got "12.5""#
        );
        let bad_tag = map(&[
            ("id", int(1)),
            (
                "items",
                V::Array(vec![map(&[
                    ("sku", text("b")),
                    ("price", int(1)),
                    ("tags", V::Array(vec![text("x"), int(7)])),
                ])]),
            ),
        ]);
        assert_eq!(
            error(order, &bad_tag),
            "data.items[0].tags[1]: expected tstr, got 7"
        );
        assert_eq!(
            error(order, &map(&[("items", V::Array(vec![]))])),
            "data.id: missing"
        );
        assert_eq!(
            error(
                order,
                &map(&[
                    ("id", int(1)),
                    ("items", V::Array(vec![])),
                    ("extra", V::Null)
                ])
            ),
            "data.extra: not in the schema"
        );
        assert_eq!(error(order, &text("x")), r#"data: expected map, got "x""#);
    }

    #[test]
    fn literals_choices_records_and_type_keys() {
        let status = r#"payload = { state: "shipped" / "pending", ? eta: uint }"#;
        assert_eq!(
            error(status, &map(&[("state", text("stolen"))])),
            r#"data.state: expected "shipped" / "pending", got "stolen""#
        );
        assert_eq!(
            error(
                status,
                &map(&[("state", text("shipped")), ("eta", int(-1))])
            ),
            "data.eta: expected uint, got -1"
        );
        let position = "payload = [lat: float / int, lon: float / int]";
        assert_eq!(
            error(position, &V::Array(vec![int(52), text("13.4")])),
            r#"data[1]: expected float / int, got "13.4""#
        );
        assert_eq!(
            error(position, &V::Array(vec![int(52)])),
            "data: expected array of 2 items, got array of 1 item"
        );
        let scores = "payload = { * tstr => uint }";
        assert_eq!(
            error(scores, &map(&[("alice", int(3)), ("bob", V::Bool(true))])),
            "data.bob: expected uint, got true"
        );
        let keyed = r#"payload = { 1 => tstr, "with space" => uint }"#;
        let value = V::Map(vec![(int(1), text("a")), (text("with space"), text("x"))]);
        assert_eq!(
            error(keyed, &value),
            r#"data["with space"]: expected uint, got "x""#
        );
        // One branch of the choice has the value's shape: the path goes into it.
        let either = "payload = tstr / { n: uint }";
        assert_eq!(
            error(either, &map(&[("n", text("1"))])),
            r#"data.n: expected uint, got "1""#
        );
        // Two maps: which one was meant is unknown, the path stops at the choice.
        let two = "payload = { a: uint } / { b: uint }";
        assert_eq!(
            error(two, &map(&[("c", int(1))])),
            "data: expected map / map, got map of 1 entry"
        );
        let long = "a".repeat(40);
        assert_eq!(
            error("payload = uint", &text(&long)),
            "data: expected uint, got tstr of 40 bytes"
        );
    }
}
