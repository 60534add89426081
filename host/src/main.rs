//! The `kvant` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kvant::checkpoint::Checkpoint;
use kvant::calibration::CalibrationSpec;
use kvant::lifecycle::{self, QuantizeReport, QuantizeRequest};
use kvant::registry::{Registry, Sources};
use kvant_plugin_api::DType;
use serde_json::{json, Map, Value};

/// Quantize large-language-model checkpoints with methods that ship as plugins.
#[derive(Parser)]
#[command(name = "kvant", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// The plugin registry file [default: $KVANT_REGISTRY, else registry.toml beside or above the kvant executable]
    #[arg(long, global = true, value_name = "FILE")]
    registry: Option<PathBuf>,
    /// Drop-in plugins folder [default: $KVANT_PLUGINS_DIR, else the registry's plugins_dir]
    #[arg(long, global = true, value_name = "DIR")]
    plugins_dir: Option<PathBuf>,
    /// Worker threads for kvant and its plugins [default: all cores]
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// More log output (-v info, -vv debug, -vvv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors; no progress bars
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Load plugin libraries even when other users could have replaced them
    #[arg(long, global = true)]
    allow_insecure_plugins: bool,
}

#[derive(Subcommand)]
enum Command {
    /// List the quantization methods the plugins provide, with their flags
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        /// Also list each method's options
        #[arg(long)]
        options: bool,
    },
    /// Describe a checkpoint: architecture, parameters, tensors by kind and dtype, quantization
    Inspect {
        /// A Hugging Face model folder (or one .safetensors file)
        model: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Quantize a checkpoint with a method and write a new checkpoint
    Quantize(QuantizeArgs),
    /// Expand a quantized checkpoint (or a GGUF file) back to a dense Hugging Face folder
    Dequantize {
        /// A quantized Hugging Face model folder, or a .gguf file
        model: PathBuf,
        /// Output folder
        #[arg(short, long)]
        out: PathBuf,
        /// Dtype of the dense weights: f32, f16 or bf16
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Replace OUT if it exists
        #[arg(long)]
        force: bool,
    },
    /// Perplexity of a model on texts; with --reference, KL divergence and top-1 agreement too
    Eval {
        /// A Hugging Face model folder (dense or quantized by a loaded method)
        model: PathBuf,
        /// Text files, concatenated in the order given
        #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
        text: Vec<PathBuf>,
        /// The model to compare against (usually the unquantized one)
        #[arg(long)]
        reference: Option<PathBuf>,
        #[command(flatten)]
        options: EvalArgs,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Work with plugin libraries
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Load one plugin library and run the conformance suite on each of its methods
    Check {
        /// The plugin library (.so, .dylib, .dll)
        path: PathBuf,
    },
}

#[derive(Args)]
struct QuantizeArgs {
    /// A Hugging Face model folder with config.json and safetensors weights
    model: PathBuf,
    /// The method, as `kvant list` names it
    #[arg(short, long)]
    method: Option<String>,
    /// Options from a TOML file (a table of key = value)
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// One option, e.g. --set bits=4 (repeatable; wins over --config)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Output folder
    #[arg(short, long)]
    out: PathBuf,
    /// Replace OUT if it exists
    #[arg(long)]
    force: bool,
    /// Keep matching modules dense: name, prefix, suffix or re:REGEX (repeatable)
    #[arg(long = "skip", value_name = "PATTERN")]
    skip: Vec<String>,
    /// Dtype of the tensors left dense: f32, f16 or bf16 [default: as in the checkpoint]
    #[arg(long)]
    dtype: Option<String>,
    /// Largest output shard, in bytes
    #[arg(long, default_value_t = kvant::checkpoint::DEFAULT_MAX_SHARD_BYTES)]
    max_shard_bytes: u64,
    /// Calibration text: files, folders of .txt/.jsonl, JSON lines with a `text` field (repeatable)
    #[arg(long, value_name = "PATH")]
    calibration: Vec<PathBuf>,
    /// Calibration windows
    #[arg(long, default_value_t = 128)]
    calibration_samples: usize,
    /// Tokens per calibration window
    #[arg(long, default_value_t = 512)]
    calibration_seq_len: usize,
    /// Products of the calibration forwards: bf16 (F32 sums; twice as fast on CPUs with
    /// AVX512-BF16, F32 elsewhere) or f32
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    calibration_precision: String,
    /// Seed of the calibration window choice
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// After quantizing, evaluate the output against the input model on these texts
    #[arg(long, value_name = "TEXT")]
    eval: Vec<PathBuf>,
    #[command(flatten)]
    eval_options: EvalArgs,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
    /// Continue an interrupted run of the same OUT (same input, method, plugin, options),
    /// skipping the modules it finished; anything changed starts over, saying what
    #[arg(long)]
    resume: bool,
    /// Stop with an error when the method spends longer than this on one module (a plugin call
    /// cannot be cancelled safely, so the run ends; --resume continues it)
    #[arg(long, value_name = "SECONDS")]
    module_timeout: Option<f64>,
    /// Keep a module dense when the method fails on it (error, panic, NaN or tensors off its
    /// plan) and list it in the report, instead of stopping; the run restarts without it
    #[arg(long)]
    skip_failed_modules: bool,
}

#[derive(Args, Clone)]
struct EvalArgs {
    /// Tokens per evaluation window
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Number of windows (default: all the text gives)
    #[arg(long)]
    windows: Option<usize>,
}

/// A mistake in how kvant was called (exit code 2), as opposed to a failure while working (1).
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

fn main() -> ExitCode {
    kvant::allocator::tune();
    let cli = Cli::parse();
    init_logging(&cli.global);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("{}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn init_logging(g: &Global) {
    let level = match (g.quiet, g.verbose) {
        (true, _) => log::LevelFilter::Error,
        (_, 0) => log::LevelFilter::Warn,
        (_, 1) => log::LevelFilter::Info,
        (_, 2) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(level);
}

fn threads(g: &Global) -> usize {
    g.threads
        .or_else(|| std::env::var("KVANT_THREADS").ok().and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// The registry file: --registry, $KVANT_REGISTRY, or registry.toml in the executable's folder
/// or up to three folders above it (a cargo build's target/release). Never the current folder.
fn registry_file(g: &Global) -> Option<PathBuf> {
    if let Some(p) = g.registry.clone().or_else(|| std::env::var_os("KVANT_REGISTRY").map(PathBuf::from)) {
        return Some(p);
    }
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    exe.ancestors().skip(1).take(4).map(|d| d.join("registry.toml")).find(|p| p.is_file())
}

fn load_registry(g: &Global) -> Result<Registry> {
    let sources = Sources {
        registry_file: registry_file(g),
        plugins_dir: g.plugins_dir.clone().or_else(|| std::env::var_os("KVANT_PLUGINS_DIR").map(PathBuf::from)),
        threads: threads(g),
        allow_insecure: g.allow_insecure_plugins,
    };
    if sources.registry_file.is_none() && sources.plugins_dir.is_none() {
        log::warn!("no registry.toml found and no plugins folder given: no methods are available");
    }
    Registry::load(&sources)
}

fn parse_dtype(s: &str) -> Result<DType> {
    match DType::parse(s) {
        Some(d) if d.is_float() && d != DType::F64 => Ok(d),
        _ => Err(usage(format!("unsupported dtype `{s}`; use f32, f16 or bf16"))),
    }
}

fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    rayon::ThreadPoolBuilder::new().num_threads(threads(g)).build_global().ok();
    match cli.command {
        Command::List { json, options } => list(&load_registry(g)?, json, options),
        Command::Inspect { model, json } => inspect(&load_registry(g)?, &model, json),
        Command::Quantize(args) => quantize(g, args),
        Command::Dequantize { model, out, dtype, force } => {
            let dtype = parse_dtype(&dtype)?;
            let registry = load_registry(g)?;
            if kvant::import::is_gguf(&model) {
                let r = kvant::import::import_gguf(&registry, &model, &out, dtype, force, !g.quiet)?;
                if !g.quiet {
                    let tok = if r.tokenizer { ", tokenizer rebuilt" } else { ", no tokenizer" };
                    println!("wrote {} ({} tensors as {dtype}{tok})", out.display(), r.tensors);
                }
                return Ok(());
            }
            let n = lifecycle::dequantize(&registry, &model, &out, dtype, force, !g.quiet)?;
            if !g.quiet {
                println!("wrote {} ({n} modules dequantized to {dtype})", out.display());
            }
            Ok(())
        }
        Command::Eval { model, text, reference, options, json } => {
            let registry = load_registry(g)?;
            let result = evaluate(&registry, &model, reference.as_deref(), &text, &options, !g.quiet)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print!("{}", kvant::eval::format_table(&result));
            }
            Ok(())
        }
        Command::Plugin(PluginCommand::Check { path }) => plugin_check(g, &path),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn list(registry: &Registry, json: bool, options: bool) -> Result<()> {
    if json {
        let methods: Vec<Value> = registry
            .methods()
            .map(|(_, m)| json!({"info": m.client.info(), "origin": m.origin.to_string()}))
            .collect();
        let broken: Vec<Value> =
            registry.broken().iter().map(|b| json!({"path": b.path, "reason": b.reason})).collect();
        println!("{}", serde_json::to_string_pretty(&json!({"methods": methods, "broken": broken}))?);
        return Ok(());
    }
    println!(
        "{:<12} {:<8} {:<11} {:<10} {:<12} {:<9} {}",
        "method", "version", "calibration", "on-the-fly", "serializable", "trainable", "description"
    );
    for (name, m) in registry.methods() {
        let i = m.client.info();
        println!(
            "{:<12} {:<8} {:<11} {:<10} {:<12} {:<9} {}",
            name,
            i.version,
            yes(i.flags.requires_calibration),
            yes(i.flags.requires_parameters_quantization),
            yes(i.flags.is_serializable),
            yes(i.flags.is_trainable),
            i.description
        );
        println!("{:<12} from {}", "", m.origin);
        if options {
            for o in &i.options {
                println!("{:<14}{} = {}  ({})", "", o.key, o.default, o.help);
            }
        }
    }
    for (name, path) in registry.disabled() {
        println!("{name:<12} disabled in the registry ({})", path.display());
    }
    for b in registry.broken() {
        println!("BROKEN       {}: {}", b.path.display(), b.reason);
    }
    Ok(())
}

fn inspect(registry: &Registry, model: &Path, json_out: bool) -> Result<()> {
    let checkpoint = Checkpoint::open(model)?;
    let skeleton = kvant::arch::skeleton(&checkpoint, &[]);
    let mut by_kind: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    let mut by_dtype: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    let mut params = 0u64;
    for m in &skeleton.modules {
        let kind = format!("{:?}", m.kind).to_lowercase();
        for t in &m.tensors {
            params += t.numel() as u64;
            let e = by_kind.entry(kind.clone()).or_default();
            e.0 += 1;
            e.1 += t.numel() as u64;
            let e = by_dtype.entry(t.dtype.to_string()).or_default();
            e.0 += 1;
            e.1 += t.byte_len() as u64;
        }
    }
    let qc = checkpoint.quantization_config().cloned();
    let method = lifecycle::checkpoint_method(registry, &checkpoint).ok().flatten().map(|(m, _)| m.client.info().name.clone());
    let config = checkpoint.config();
    if json_out {
        let out = json!({
            "path": model, "model_type": skeleton.model_type, "architectures": config.get("architectures"),
            "parameters": params, "bytes": checkpoint.total_bytes(), "tensors": checkpoint.len(),
            "by_kind": by_kind, "by_dtype": by_dtype, "quantization_config": qc, "method": method,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("model:        {}", model.display());
    println!("architecture: {} ({})", config.get("architectures").map_or("?".into(), |a| a.to_string()), skeleton.model_type);
    println!("parameters:   {} ({:.1} M)", params, params as f64 / 1e6);
    println!("size:         {:.1} MB in {} tensors", checkpoint.total_bytes() as f64 / 1e6, checkpoint.len());
    println!("by kind:");
    for (k, (n, p)) in &by_kind {
        println!("  {k:<10} {n:>5} tensors {:>12} values", p);
    }
    println!("by dtype:");
    for (d, (n, b)) in &by_dtype {
        println!("  {d:<10} {n:>5} tensors {:>12} bytes", b);
    }
    match (qc, method) {
        (Some(qc), m) => {
            println!("quantized:    {} (method: {})", qc, m.unwrap_or_else(|| "no loaded plugin reads it".into()))
        }
        (None, _) => println!("quantized:    no"),
    }
    Ok(())
}

fn parse_options(args: &QuantizeArgs) -> Result<Map<String, Value>> {
    let mut options = Map::new();
    if let Some(file) = &args.config {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| usage(format!("{} is not valid TOML: {e}", file.display())))?;
        let value = serde_json::to_value(table)?;
        options.extend(value.as_object().cloned().unwrap_or_default());
    }
    for kv in &args.set {
        let (k, v) = kv.split_once('=').ok_or_else(|| usage(format!("--set `{kv}`: expected KEY=VALUE")))?;
        // Numbers, booleans and lists as JSON; anything else is a string.
        let value = serde_json::from_str(v.trim()).unwrap_or_else(|_| Value::String(v.trim().to_string()));
        options.insert(k.trim().to_string(), value);
    }
    Ok(options)
}

fn quantize(g: &Global, args: QuantizeArgs) -> Result<()> {
    let registry = load_registry(g)?;
    let request = QuantizeRequest {
        model: args.model.clone(),
        method: args.method.clone(),
        options: parse_options(&args)?,
        out: args.out.clone(),
        force: args.force,
        not_convert: args.skip.clone(),
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        threads: threads(g),
        max_shard_bytes: args.max_shard_bytes,
        progress: !g.quiet,
        calibration: (!args.calibration.is_empty()).then(|| CalibrationSpec {
            paths: args.calibration.clone(),
            n_samples: args.calibration_samples,
            seq_len: args.calibration_seq_len,
            seed: args.seed,
            bf16_products: args.calibration_precision == "bf16",
        }),
        resume: args.resume,
        module_timeout: args
            .module_timeout
            .map(|s| std::time::Duration::try_from_secs_f64(s).map_err(|_| usage(format!("--module-timeout {s}: not a duration"))))
            .transpose()?,
        skip_failed_modules: args.skip_failed_modules,
    };
    let report = lifecycle::quantize(&registry, &request).map_err(|e| {
        if e.to_string().starts_with("invalid options") || e.to_string().starts_with("no method named") {
            usage(e.to_string())
        } else {
            e
        }
    })?;
    let quality = if args.eval.is_empty() {
        None
    } else {
        Some(evaluate(&registry, &args.out, Some(&args.model), &args.eval, &args.eval_options, !g.quiet)?)
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json!({"quantization": report, "evaluation": quality}))?);
    } else if !g.quiet {
        print_report(&report);
        if let Some(q) = quality {
            println!("quality against {}:", args.model.display());
            print!("{}", kvant::eval::format_table(&q));
        }
    }
    Ok(())
}

/// Loads `model` (and `reference`), tokenizes `texts` with the model's tokenizer.json and
/// evaluates, with a bar over the work.
fn evaluate(
    registry: &Registry,
    model: &Path,
    reference: Option<&Path>,
    texts: &[PathBuf],
    options: &EvalArgs,
    progress: bool,
) -> Result<kvant::eval::EvalResult> {
    let tokenizer = model.join("tokenizer.json");
    if !tokenizer.is_file() {
        bail!("{} has no tokenizer.json; evaluation needs it", model.display());
    }
    let tokens = kvant::eval::tokenize(&tokenizer, texts)?;
    let loaded = kvant::packed::load_model(registry, model)?;
    if let Some(m) = &loaded.method {
        log::info!("{}: {} layers run packed through method `{m}`", model.display(), loaded.packed_layers);
    }
    let reference = reference.map(|r| kvant::packed::load_model(registry, r)).transpose()?;
    let opts = kvant::eval::EvalOptions { ctx: options.ctx, windows: options.windows, ..Default::default() };
    let bar = std::cell::RefCell::new(None::<kvant::progress::Bar>);
    let result = kvant::eval::evaluate(&loaded.model, reference.as_ref().map(|r| &r.model), &tokens, &opts, &mut |done, total| {
        let mut bar = bar.borrow_mut();
        let bar = bar.get_or_insert_with(|| kvant::progress::Bar::new(total as u64, "eval", progress));
        bar.set_position(done as u64);
    })
    .with_context(|| {
        let texts: Vec<String> = texts.iter().map(|t| t.display().to_string()).collect();
        format!("evaluating {} on {}", model.display(), texts.join(", "))
    })?;
    Ok(result)
}

fn print_report(r: &QuantizeReport) {
    println!("quantized with `{}` -> {}", r.method, r.out.display());
    println!("  options:        {}", Value::Object(r.config.clone()));
    println!(
        "  size:           {:.1} MB -> {:.1} MB ({:.2}x smaller)",
        r.bytes_in as f64 / 1e6,
        r.bytes_out as f64 / 1e6,
        r.bytes_in as f64 / r.bytes_out.max(1) as f64
    );
    println!("  bits/weight:    {:.3} in converted modules, {:.3} over all parameters", r.bits_per_weight, r.bits_per_parameter);
    println!("  modules:        {} converted, {} Linear kept dense", r.modules.len(), r.not_converted.len());
    for (name, why) in r.not_converted.iter().filter(|(_, why)| why.starts_with("quantize failed")) {
        println!("    dense: {name} ({why})");
    }
    for (name, why) in r.not_converted.iter().filter(|(_, why)| !why.starts_with("quantize failed")).take(5) {
        println!("    dense: {name} ({why})");
    }
    if let Some(w) = r.worst() {
        println!("  rel. error:     mean {:.4}, worst {:.4} ({})", r.mean_error(), w.relative_error, w.name);
    }
    println!("  time:           {:.2} s", r.seconds);
}

fn plugin_check(g: &Global, path: &Path) -> Result<()> {
    if !path.is_file() {
        return Err(usage(format!("{} is not a file", path.display())));
    }
    let report = kvant::conformance::check_library(path, threads(g)).map_err(|reason| anyhow!("{}: {reason}", path.display()))?;
    println!("{}: {} method(s): {}", path.display(), report.methods.len(), report.methods.join(", "));
    for check in &report.checks {
        println!("{check}");
    }
    let failed = report.failures().count();
    if failed > 0 {
        bail!("{}: {failed} of {} checks failed", path.display(), report.checks.len());
    }
    println!("all {} checks passed", report.checks.len());
    Ok(())
}
