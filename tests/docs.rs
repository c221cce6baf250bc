//! The protocol's documentation against the code: every JSON example in docs/mqtt.md parses as
//! the type the station sends or accepts under that heading, and names the same fields, so the
//! document cannot drift from the station.

mod common;

use std::collections::BTreeSet;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use takumi::appliance::protocol::{Event, ResultMeta, Status, TemplatesReply, parse_command};

/// Each ```json block of `text`, with the `## ` heading it sits under.
fn examples(text: &str) -> Vec<(String, String)> {
    let mut heading = String::new();
    let mut block: Option<String> = None;
    let mut out = Vec::new();
    for line in text.lines() {
        match (&mut block, line.trim_end()) {
            (None, l) if l.starts_with("## ") => heading = l[3..].to_string(),
            (None, "```json") => block = Some(String::new()),
            (Some(b), "```") => {
                out.push((heading.clone(), std::mem::take(b)));
                block = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            _ => {}
        }
    }
    out
}

/// Every field path of a JSON value: `link.sent`, `counters.errors`, ...
fn paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(m) = v {
        for (k, v) in m {
            let p = format!("{prefix}{k}");
            paths(v, &format!("{p}."), out);
            out.insert(p);
        }
    }
}

/// `json` parses as `T`, and `T` written back names exactly the fields the example names.
fn same_fields<T: DeserializeOwned + Serialize>(json: &str) -> Result<(), String> {
    let parsed: T = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let (mut doc, mut code) = (BTreeSet::new(), BTreeSet::new());
    paths(
        &serde_json::from_str(json).map_err(|e| e.to_string())?,
        "",
        &mut doc,
    );
    paths(
        &serde_json::to_value(&parsed).map_err(|e| e.to_string())?,
        "",
        &mut code,
    );
    match doc == code {
        true => Ok(()),
        false => Err(format!("fields differ: document {doc:?}, station {code:?}")),
    }
}

fn check(heading: &str, json: &str) -> Result<(), String> {
    match heading {
        "Commands (`cmd`)" => parse_command(json.as_bytes())
            .map(drop)
            .map_err(|e| e.to_string()),
        "Results" => same_fields::<ResultMeta>(json),
        "Events" => same_fields::<Event>(json),
        "Status" => same_fields::<Status>(json),
        "Replies to `templates.list`" => same_fields::<TemplatesReply>(json),
        other => Err(format!("no type known for examples under '## {other}'")),
    }
}

#[test]
fn every_json_example_in_the_protocol_parses_as_the_station_type() {
    let text = std::fs::read_to_string(common::repo().join("docs/mqtt.md")).unwrap();
    let found = examples(&text);
    let headings: BTreeSet<&str> = found.iter().map(|(h, _)| h.as_str()).collect();
    for h in ["Commands (`cmd`)", "Results", "Events", "Status"] {
        assert!(headings.contains(h), "no example under '## {h}'");
    }
    let bad: Vec<String> = found
        .iter()
        .filter_map(|(h, json)| check(h, json).err().map(|e| format!("{h}: {e}\n{json}")))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n\n"));
}

#[test]
fn the_readme_commands_parse() {
    let text = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let commands: Vec<&str> = text
        .split("-m '")
        .skip(1)
        .filter_map(|rest| rest.split('\'').next())
        .collect();
    assert!(commands.len() >= 3, "{commands:?}");
    for c in commands {
        parse_command(c.as_bytes()).unwrap_or_else(|e| panic!("{c}: {e}"));
    }
}
