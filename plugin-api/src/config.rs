//! Method options: what a plugin publishes, and the validated settings it receives.
//!
//! A plugin lists its options once ([`OptionSpec`]); the contract then validates any user
//! configuration against that list and reports every problem at once, each naming its key.
//! Plugins only add the rules that involve several keys ([`crate::QuantMethod::check_config`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The type and allowed values of one option.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OptionKind {
    /// `true` or `false`.
    Bool,
    /// An integer in `min..=max`.
    Int {
        /// Smallest allowed value.
        min: i64,
        /// Largest allowed value.
        max: i64,
    },
    /// An integer from a fixed list (e.g. bits 2, 3, 4, 8).
    IntChoice {
        /// The allowed values.
        values: Vec<i64>,
    },
    /// A number in `min..=max`.
    Float {
        /// Smallest allowed value.
        min: f64,
        /// Largest allowed value.
        max: f64,
    },
    /// A string from a fixed list.
    Choice {
        /// The allowed values.
        values: Vec<String>,
    },
    /// Any string.
    String,
    /// A list of strings (module patterns, for instance).
    StringList,
}

/// One option a method accepts, with its Hugging Face key name where one exists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptionSpec {
    /// The key, e.g. `bits` or `bnb_4bit_quant_type`.
    pub key: String,
    /// Type and allowed values.
    pub kind: OptionKind,
    /// Value used when the user gives none. `null` makes the option optional: `null` is then
    /// also accepted from the user and means "not set".
    pub default: Value,
    /// One line for `kvant list --options` and error messages.
    pub help: String,
}

impl OptionSpec {
    fn new(key: &str, kind: OptionKind, default: Value, help: &str) -> Self {
        OptionSpec { key: key.into(), kind, default, help: help.into() }
    }

    /// A boolean option.
    pub fn bool(key: &str, default: bool, help: &str) -> Self {
        Self::new(key, OptionKind::Bool, Value::Bool(default), help)
    }

    /// An integer option in `min..=max`.
    pub fn int(key: &str, default: i64, min: i64, max: i64, help: &str) -> Self {
        Self::new(key, OptionKind::Int { min, max }, default.into(), help)
    }

    /// An integer option restricted to `values`.
    pub fn int_choice(key: &str, default: i64, values: &[i64], help: &str) -> Self {
        Self::new(key, OptionKind::IntChoice { values: values.to_vec() }, default.into(), help)
    }

    /// A float option in `min..=max`.
    pub fn float(key: &str, default: f64, min: f64, max: f64, help: &str) -> Self {
        Self::new(key, OptionKind::Float { min, max }, default.into(), help)
    }

    /// A string option restricted to `values`.
    pub fn choice(key: &str, default: &str, values: &[&str], help: &str) -> Self {
        let values = values.iter().map(|s| s.to_string()).collect();
        Self::new(key, OptionKind::Choice { values }, default.into(), help)
    }

    /// A free string option; `default` `None` makes it optional.
    pub fn string(key: &str, default: Option<&str>, help: &str) -> Self {
        Self::new(key, OptionKind::String, default.map_or(Value::Null, Value::from), help)
    }

    /// A list-of-strings option, empty by default... or `null` when `nullable`.
    pub fn string_list(key: &str, nullable: bool, help: &str) -> Self {
        let default = if nullable { Value::Null } else { Value::Array(vec![]) };
        Self::new(key, OptionKind::StringList, default, help)
    }

    /// Makes the option optional: its default becomes `null` ("not set").
    pub fn optional(mut self) -> Self {
        self.default = Value::Null;
        self
    }

    /// Checks one user value, coercing strings from `--set key=value` where unambiguous.
    fn check(&self, value: &Value) -> Result<Value, String> {
        if value.is_null() && self.default.is_null() {
            return Ok(Value::Null);
        }
        let as_text = value.as_str();
        match &self.kind {
            OptionKind::Bool => match (value, as_text) {
                (Value::Bool(b), _) => Ok(Value::Bool(*b)),
                (_, Some("true")) => Ok(Value::Bool(true)),
                (_, Some("false")) => Ok(Value::Bool(false)),
                _ => Err(format!("expected true or false, got {value}")),
            },
            OptionKind::Int { min, max } => {
                let v = int_value(value).ok_or_else(|| format!("expected an integer, got {value}"))?;
                if v < *min || v > *max {
                    return Err(format!("{v} is out of range {min}..={max}"));
                }
                Ok(v.into())
            }
            OptionKind::IntChoice { values } => {
                let v = int_value(value).ok_or_else(|| format!("expected an integer, got {value}"))?;
                if !values.contains(&v) {
                    return Err(format!("{v} is not one of {values:?}"));
                }
                Ok(v.into())
            }
            OptionKind::Float { min, max } => {
                let v = value
                    .as_f64()
                    .or_else(|| as_text.and_then(|s| s.parse().ok()))
                    .filter(|v: &f64| v.is_finite())
                    .ok_or_else(|| format!("expected a number, got {value}"))?;
                if v < *min || v > *max {
                    return Err(format!("{v} is out of range {min}..={max}"));
                }
                Ok(v.into())
            }
            OptionKind::Choice { values } => match as_text {
                Some(s) if values.iter().any(|c| c == s) => Ok(s.into()),
                Some(s) => Err(format!("\"{s}\" is not one of {}", values.join(", "))),
                None => Err(format!("expected one of {}, got {value}", values.join(", "))),
            },
            OptionKind::String => match as_text {
                Some(s) => Ok(s.into()),
                None => Err(format!("expected a string, got {value}")),
            },
            OptionKind::StringList => match value {
                Value::Array(items) if items.iter().all(Value::is_string) => Ok(value.clone()),
                // `--set skip=lm_head,embed` arrives as one string.
                Value::String(s) => Ok(Value::Array(
                    s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(Value::from).collect(),
                )),
                _ => Err(format!("expected a list of strings, got {value}")),
            },
        }
    }
}

fn int_value(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
        .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

/// One thing wrong with a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigProblem {
    /// The key at fault (the first one, when the rule involves several).
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl ConfigProblem {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigProblem { key: key.into(), message: message.into() }
    }
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

/// A validated configuration: every published option present, with a value of its type.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Config {
    values: Map<String, Value>,
}

impl Config {
    /// Validates `user` against `options`: unknown keys, wrong types and out-of-range values are
    /// all reported together; missing keys take their defaults.
    pub fn validate(options: &[OptionSpec], user: &Map<String, Value>) -> Result<Config, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        for key in user.keys() {
            if !options.iter().any(|o| &o.key == key) {
                let known: Vec<&str> = options.iter().map(|o| o.key.as_str()).collect();
                problems.push(ConfigProblem::new(
                    key,
                    format!("unknown option; this method accepts: {}", known.join(", ")),
                ));
            }
        }
        let mut values = Map::new();
        for option in options {
            match user.get(&option.key) {
                None => {
                    values.insert(option.key.clone(), option.default.clone());
                }
                Some(v) => match option.check(v) {
                    Ok(v) => {
                        values.insert(option.key.clone(), v);
                    }
                    Err(message) => problems.push(ConfigProblem::new(&option.key, message)),
                },
            }
        }
        if problems.is_empty() {
            Ok(Config { values })
        } else {
            Err(problems)
        }
    }

    /// Wraps values that were validated before (as they cross the plugin boundary).
    pub(crate) fn from_validated(values: Map<String, Value>) -> Config {
        Config { values }
    }

    /// All keys and values.
    pub fn values(&self) -> &Map<String, Value> {
        &self.values
    }

    /// The raw value of `key`, if the method publishes it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key).filter(|v| !v.is_null())
    }

    /// A boolean option. Panics (reported to the host as an error) if `key` is not a published
    /// boolean option: that is a bug in the plugin, not in the user's input.
    pub fn bool(&self, key: &str) -> bool {
        self.get(key).and_then(Value::as_bool).unwrap_or_else(|| missing(key, "boolean"))
    }

    /// An integer option (see [`Config::bool`] for when it panics).
    pub fn int(&self, key: &str) -> i64 {
        self.get(key).and_then(Value::as_i64).unwrap_or_else(|| missing(key, "integer"))
    }

    /// A float option (see [`Config::bool`] for when it panics).
    pub fn float(&self, key: &str) -> f64 {
        self.get(key).and_then(Value::as_f64).unwrap_or_else(|| missing(key, "number"))
    }

    /// A string or choice option (see [`Config::bool`] for when it panics).
    pub fn str(&self, key: &str) -> &str {
        self.get(key).and_then(Value::as_str).unwrap_or_else(|| missing(key, "string"))
    }

    /// An optional string option: `None` when not set.
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// A list-of-strings option; empty when not set.
    pub fn str_list(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        }
    }
}

fn missing(key: &str, kind: &str) -> ! {
    panic!("plugin bug: option `{key}` is not a published {kind} option")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options() -> Vec<OptionSpec> {
        vec![
            OptionSpec::int_choice("bits", 4, &[2, 3, 4, 8], "bits per weight"),
            OptionSpec::int("group_size", 128, -1, 4096, "group size"),
            OptionSpec::bool("sym", true, "symmetric"),
            OptionSpec::float("damp_percent", 0.01, 0.0, 1.0, "damping"),
            OptionSpec::choice("quant_type", "nf4", &["nf4", "fp4"], "table"),
            OptionSpec::string_list("skip", true, "modules to skip"),
        ]
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let c = Config::validate(&options(), &Map::new()).unwrap();
        assert_eq!((c.int("bits"), c.int("group_size"), c.bool("sym")), (4, 128, true));
        assert_eq!(c.str("quant_type"), "nf4");
        assert!(c.get("skip").is_none());
        assert!(c.str_list("skip").is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let user = json!({"bits": 5, "group_size": "big", "sym": 3, "damp_percent": 2.0,
                          "quant_type": "int4", "colour": "red"});
        let problems = Config::validate(&options(), user.as_object().unwrap()).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["colour", "bits", "group_size", "sym", "damp_percent", "quant_type"]);
        assert!(problems[0].message.contains("bits, group_size"), "{}", problems[0]);
        assert!(problems[1].message.contains("not one of [2, 3, 4, 8]"));
        assert!(problems[4].message.contains("out of range"));
    }

    #[test]
    fn strings_from_the_command_line_are_coerced() {
        let user = json!({"bits": "8", "sym": "false", "damp_percent": "0.1", "skip": "lm_head, embed"});
        let c = Config::validate(&options(), user.as_object().unwrap()).unwrap();
        assert_eq!(c.int("bits"), 8);
        assert!(!c.bool("sym"));
        assert_eq!(c.float("damp_percent"), 0.1);
        assert_eq!(c.str_list("skip"), ["lm_head", "embed"]);
    }

    #[test]
    fn null_is_accepted_only_for_optional_options() {
        let ok = json!({"skip": null});
        assert!(Config::validate(&options(), ok.as_object().unwrap()).is_ok());
        let bad = json!({"bits": null});
        let problems = Config::validate(&options(), bad.as_object().unwrap()).unwrap_err();
        assert_eq!(problems[0].key, "bits");
    }
}
