//! Times the F32 evaluation of SmolLM2-135M on 8 windows of 512 tokens (the figure PyTorch
//! reaches in about 7.6 s on the 2-core reference machine).
//!
//! `cargo bench -p kvant --bench eval`. The model folder is `$KVANT_TEST_HF_MODEL`, else
//! `<cache>/smollm2-f32`; the text `<cache>/sotu-2000s.txt`; the cache
//! `$KVANT_CACHE`, else `<repo>/.cache/kvant`. `KVANT_BENCH_RUNS` sets the repetitions (3).
//!
//! Besides wall-clock time it prints the process CPU time of each run: on a shared machine the
//! wall time depends on the other load, while CPU time / threads estimates an idle machine.

use std::path::PathBuf;
use std::time::Instant;

use kvant::eval::{evaluate, format_table, tokenize, EvalOptions};
use kvant::model::LlamaModel;

fn main() -> anyhow::Result<()> {
    let cache = std::env::var_os("KVANT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/kvant"));
    let dir = std::env::var_os("KVANT_TEST_HF_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("smollm2-f32"));
    let text = cache.join("sotu-2000s.txt");
    if !dir.join("model.safetensors").is_file() || !text.is_file() {
        eprintln!("skipping: needs {} and {}", dir.display(), text.display());
        return Ok(());
    }
    let runs: usize = std::env::var("KVANT_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);

    let t = Instant::now();
    let model = LlamaModel::open(&dir)?;
    println!("load: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let tokens = tokenize(&dir.join("tokenizer.json"), &[text])?;
    println!("tokenize: {:.2} s ({} tokens)", t.elapsed().as_secs_f64(), tokens.len());

    let opts = EvalOptions { ctx: 512, windows: Some(8), batch: 8 };
    let mut times = Vec::new();
    for run in 0..runs {
        let cpu0 = cpu_seconds();
        let r = evaluate(&model, None, &tokens, &opts, &mut |_, _| {})?;
        let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
        if run == 0 {
            print!("{}", format_table(&r));
        }
        match cpu {
            Some(cpu) => println!("run {run}: {:.2} s wall, {cpu:.2} s CPU", r.seconds),
            None => println!("run {run}: {:.2} s wall", r.seconds),
        }
        times.push(r.seconds);
    }
    breakdown(&model, &tokens[..8 * 512])?;
    times.sort_by(f64::total_cmp);
    println!(
        "8 x 512 F32 eval on {} threads: best {:.2} s, median {:.2} s",
        rayon::current_num_threads(),
        times[0],
        times[times.len() / 2]
    );
    Ok(())
}

/// Times the decoder blocks and the LM head separately, with the rate of useful arithmetic
/// (causal attention counted for the visible keys only), which shows how close each part runs
/// to the machine's matrix-product speed.
fn breakdown(model: &LlamaModel, tokens: &[u32]) -> anyhow::Result<()> {
    let c = model.config();
    let (batch, seq) = (8, 512);
    let rows = (batch * seq) as f64;
    let (h, qo, kvo, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let linear_params = (h * qo + 2 * h * kvo + qo * h + 3 * h * f) as f64;
    // Scores and weighted sum: 2 products of head_dim per visible (query, key) pair.
    let attn_pairs = (batch * c.num_heads * seq * (seq + 1) / 2) as f64;
    let block_flop = c.num_layers as f64 * (2.0 * rows * linear_params + 4.0 * attn_pairs * c.head_dim as f64);
    let t = Instant::now();
    let hidden = model.final_hidden(tokens, batch, seq, &mut |_| {})?;
    let blocks = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for w in 0..batch {
        model.lm_head(&hidden[w * seq * h..(w * seq + seq - 1) * h], seq - 1)?;
    }
    let head = t.elapsed().as_secs_f64();
    let head_flop = 2.0 * (batch * (seq - 1)) as f64 * (c.vocab_size * h) as f64;
    println!(
        "blocks: {blocks:.2} s ({:.0} GFLOP/s); lm head: {head:.2} s ({:.0} GFLOP/s)",
        block_flop / blocks / 1e9,
        head_flop / head / 1e9
    );
    Ok(())
}

/// User + system CPU time of this process so far, from `/proc/self/stat` (Linux only; the
/// kernel reports it in ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
