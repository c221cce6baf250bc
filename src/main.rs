//! The `takumi` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use takumi::Error;
use takumi::capture::load_for_learn;
use takumi::config::Config;
use takumi::engine::card::{self, RatioStyle};
use takumi::engine::{Engine, LearnOptions, Precision, Prior};
use takumi::publish::file::ImageKind;
use takumi::store::{Template, TemplateName, TemplateStore};

#[derive(Parser)]
#[command(
    name = "takumi",
    version,
    about = "Learn a visual edit from one before/after pair and replay it"
)]
struct Cli {
    /// Station config (TOML); built-in defaults when absent.
    #[arg(long, global = true, env = "TAKUMI_CONFIG")]
    config: Option<PathBuf>,
    /// Template store folder (overrides the config).
    #[arg(long, global = true, env = "TAKUMI_STORE")]
    store: Option<PathBuf>,
    /// Model folder (overrides the config).
    #[arg(long, global = true, env = "TAKUMI_MODELS")]
    models: Option<PathBuf>,
    /// float, f16 or int8 (overrides the config).
    #[arg(long, global = true)]
    precision: Option<Precision>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PriorArg {
    Zero,
    Hypernet,
}

#[derive(Subcommand)]
enum Cmd {
    /// Learn a template from one or more before/after pairs of the same edit.
    ///
    /// Images of any size up to 200 MB of pixels (an 8000x6000 photo takes 144 MB) are taken;
    /// those over about 3 megapixels are downscaled to it first, and the template records both
    /// sizes.
    Learn {
        #[arg(long = "before", required = true)]
        before: Vec<PathBuf>,
        #[arg(long = "after", required = true)]
        after: Vec<PathBuf>,
        #[arg(long)]
        name: String,
        /// What the fit falls back on where the pair says nothing: H(A, A')'s template, or zero
        /// (the same fit without the hypernetwork, for ablation).
        #[arg(long, value_enum, default_value_t = PriorArg::Hypernet)]
        prior: PriorArg,
        /// Ablation: no closed-form fit, the template is H(A, A') alone.
        #[arg(long)]
        no_fit: bool,
    },
    /// Apply a template to an image or to every image in a folder.
    ///
    /// Inputs are turned upright as their EXIF orientation says. A PNG output keeps the input's
    /// alpha channel and 16-bit depth; a JPEG output is 8-bit RGB, without alpha (a warning
    /// says so).
    Apply {
        #[arg(long)]
        template: String,
        /// A PNG or JPEG, or a folder of them.
        #[arg(long)]
        input: PathBuf,
        /// .png (keeps alpha and 16-bit) or .jpg/.jpeg (8-bit RGB); a folder for a folder.
        #[arg(long)]
        output: PathBuf,
        /// Undo the edit (the negated template, as in LoRA Reverse).
        #[arg(long)]
        reverse: bool,
    },
    /// List, show or remove stored templates.
    Templates {
        #[command(subcommand)]
        cmd: TemplatesCmd,
    },
    /// Time learn and apply (float and int8), peak RSS, and onnxruntime on the same models.
    Bench(takumi::bench::BenchArgs),
    /// Run the station service (MQTT, camera, display) until stopped.
    Run,
    /// Start the host profile and drive it over MQTT: learn the sample pair, apply it to the
    /// sample captures, approve the results; writes ./takumi-demo/.
    Demo {
        #[arg(long, default_value = "models/samples")]
        samples: PathBuf,
        #[arg(long, default_value = "takumi-demo")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TemplatesCmd {
    List,
    Show { name: String },
    Rm { name: String },
}

/// The model folder the built-in defaults name (relative: a checkout's `models/`).
const REPO_MODELS: &str = "models";
/// Where the .deb installs the models (board/deb/build.sh).
const PACKAGED_MODELS: &str = "/usr/share/takumi/models";

/// Info for takumi's own lines; rumqttd logs every client disconnect as an error, so it stays
/// quiet unless asked for, and tract's notes on its kernels are not news to an operator.
const DEFAULT_LOG: &str = "info,rumqttd=off,tract_core=warn,tract_linalg=warn,tract_onnx=warn";

/// `demo` prints its own account of the run; the station's lines would interleave with it.
const DEMO_LOG: &str = "warn,rumqttd=off";

/// `TAKUMI_LOG`, else `RUST_LOG`, else `default`.
fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    ["TAKUMI_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|v| tracing_subscriber::EnvFilter::try_from_env(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default))
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    let cli = Cli::parse();
    let default = match cli.cmd {
        Cmd::Demo { .. } => DEMO_LOG,
        _ => DEFAULT_LOG,
    };
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(default))
        // colour codes only for a person at a terminal; journald and files get plain text
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    takumi::engine::kernels::log_chosen();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(s) = cli.store {
        cfg.store.dir = s;
    }
    if let Some(m) = cli.models {
        cfg.engine.models = m;
    } else if cfg.engine.models == Path::new(REPO_MODELS)
        && !cfg.engine.models.exists()
        && Path::new(PACKAGED_MODELS).exists()
    {
        // the default is the repository's folder, for a checkout; an installed package keeps
        // its models where board/deb/build.sh puts them, so `takumi` works there from any folder
        // (and with neither, the error names the repository's folder)
        cfg.engine.models = PACKAGED_MODELS.into();
    }
    if let Some(p) = cli.precision {
        cfg.engine.precision = p;
    }
    match cli.cmd {
        Cmd::Learn {
            before,
            after,
            name,
            prior,
            no_fit,
        } => {
            let opts = LearnOptions {
                prior: match prior {
                    PriorArg::Zero => Prior::Zero,
                    PriorArg::Hypernet => Prior::Hypernet,
                },
                closed_form: !no_fit,
            };
            learn(&cfg, &before, &after, &name, opts)
        }
        Cmd::Apply {
            template,
            input,
            output,
            reverse,
        } => apply(&cfg, &template, &input, &output, reverse),
        Cmd::Templates { cmd } => templates(&cfg, cmd),
        Cmd::Bench(args) => takumi::bench::run(&cfg, &args).map_err(Into::into),
        Cmd::Run => {
            if cli.config.is_none() {
                bail!("run needs --config FILE (for example board/host.toml)");
            }
            runtime()?.block_on(async {
                let svc = takumi::appliance::service::start(cfg).await?;
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                svc.stop().await?;
                anyhow::Ok(())
            })
        }
        Cmd::Demo { samples, out } => {
            let cfg = if cli.config.is_none() {
                let mut host = Config::load(Path::new("board/host.toml"))?;
                // the demo drives itself: its broker must not clash with a station on 1883
                host.mqtt.port = 0;
                host
            } else {
                cfg
            };
            runtime()?.block_on(takumi::appliance::demo::run(cfg, &samples, &out))?;
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn engine(cfg: &Config) -> anyhow::Result<Engine> {
    Ok(
        Engine::load(&cfg.engine.models, cfg.engine.precision, cfg.engine.threads)?
            .with_memory_budget(cfg.engine.memory_mb),
    )
}

fn learn(
    cfg: &Config,
    before: &[PathBuf],
    after: &[PathBuf],
    name: &str,
    opts: LearnOptions,
) -> anyhow::Result<()> {
    let name = TemplateName::new(name)?;
    if before.len() != after.len() {
        bail!(
            "learn: {} --before but {} --after; give them in pairs",
            before.len(),
            after.len()
        );
    }
    let store = TemplateStore::open(&cfg.store.dir)?;
    let (pairs, originals) = read_pairs(cfg, before, after)?;
    let eng = engine(cfg)?;
    let t0 = std::time::Instant::now();
    let mut t = Template::learn(&eng, name.clone(), &pairs, opts)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    for (s, original) in t.sources.iter_mut().zip(originals) {
        s.read_from(original);
    }
    store.save(&t)?;
    let c = &t.card;
    println!(
        "learned {name} from {} pair(s) in {ms:.0} ms: {}; exposure {:+.2} EV, contrast {}, saturation {}, sharpness {}",
        c.pairs,
        c.validation_summary(),
        c.exposure_ev,
        card::ratio_text(c.contrast, RatioStyle::Short),
        card::ratio_text(c.saturation, RatioStyle::Short),
        card::ratio_text(c.sharpness, RatioStyle::Short)
    );
    for (i, s) in t.sources.iter().enumerate() {
        if s.downscaled_from.is_some() {
            println!("pair {i} learned at {}", s.size_text());
        }
    }
    for (i, r) in c
        .registration
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.registered)
    {
        eprintln!(
            "warning: pair {i} ({}) does not register (residual {:.1} px): it was not fitted pixel-wise",
            before[i].display(),
            r.residual_px
        );
    }
    Ok(())
}

/// Before/after frames as learn takes them.
type Pairs = Vec<(takumi::Frame, takumi::Frame)>;

/// The pairs as learn works on them (each image upright, and downscaled where it is larger than
/// learn works at), with the files' own sizes. One image at full size is held at a time.
fn read_pairs(
    cfg: &Config,
    before: &[PathBuf],
    after: &[PathBuf],
) -> anyhow::Result<(Pairs, Vec<[u32; 2]>)> {
    let max_px = Engine::learn_max_px(before.len());
    let (mut pairs, mut originals) = (Vec::new(), Vec::new());
    for (b, a) in before.iter().zip(after) {
        let sb = load_for_learn(b, &cfg.limits, max_px)?;
        let sa = load_for_learn(a, &cfg.limits, max_px)?;
        // compared at the files' sizes: those are what the user can see and fix
        let ((bw, bh), (aw, ah)) = (sb.original, sa.original);
        if (bw, bh) != (aw, ah) {
            return Err(Error::PairSize {
                before: b.clone(),
                after: a.clone(),
                bw: bw as usize,
                bh: bh as usize,
                aw: aw as usize,
                ah: ah as usize,
            }
            .into());
        }
        originals.push([bw, bh]);
        pairs.push((sb.frame, sa.frame));
    }
    Ok((pairs, originals))
}

fn is_image(p: &Path) -> bool {
    p.is_file() && ImageKind::from_path(p).is_some()
}

/// All or nothing: outputs go to temporary names and are renamed into place only when every
/// input was read and made (each unreadable one is named); on any failure no new file or folder
/// is left behind. Each input is decoded once. A success ends with a summary line on stderr
/// (stdout keeps one line per output, for scripts); a progress bar shows on a terminal.
fn apply(
    cfg: &Config,
    template: &str,
    input: &Path,
    output: &Path,
    reverse: bool,
) -> anyhow::Result<()> {
    let name = TemplateName::new(template)?;
    let store = TemplateStore::open(&cfg.store.dir)?;
    let t = store.load(&name)?;
    let eng = engine(cfg)?;
    if t.model_hash != eng.models.hash {
        return Err(Error::WrongModel {
            name: name.to_string(),
            expected: eng.models.hash.clone(),
            found: t.model_hash.clone(),
        }
        .into());
    }
    let jobs = apply_jobs(input, output)?;
    let made = if input.is_dir() {
        create_dirs(output)?
    } else {
        Vec::new()
    };
    let job = takumi::apply::Job {
        cfg,
        eng: &eng,
        template: &t,
        reverse,
    };
    let t0 = std::time::Instant::now();
    let bar = progress_bar(jobs.len());
    let lines = takumi::apply::render(&job, &jobs, || bar.inc(1)).and_then(|r| {
        r.batch.commit()?;
        Ok((r.lines, r.warnings))
    });
    bar.finish_and_clear();
    match lines {
        Ok((lines, warnings)) => {
            lines.iter().for_each(|l| println!("{l}"));
            warnings.iter().for_each(|w| eprintln!("{w}"));
            // a failure's summary is its one error line, which counts the failed inputs
            eprintln!("{}", summary(jobs.len(), t0.elapsed()));
            Ok(())
        }
        Err(e) => {
            // innermost first; a folder that is not empty is kept
            made.iter().for_each(|d| drop(std::fs::remove_dir(d)));
            Err(e.into())
        }
    }
}

/// A bar on stderr when a person watches it; hidden otherwise, so logs and pipes stay clean.
fn progress_bar(n: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if n < 2 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let style = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    indicatif::ProgressBar::new(n as u64).with_style(style)
}

/// `apply: 20 files, 0 failed, 41.3 ms per frame (decode, apply, encode, write)`.
fn summary(files: usize, took: std::time::Duration) -> String {
    let ms = took.as_secs_f64() * 1e3 / files.max(1) as f64;
    let s = if files == 1 { "" } else { "s" };
    format!("apply: {files} file{s}, 0 failed, {ms:.1} ms per frame (decode, apply, encode, write)")
}

/// (input, output) pairs: a folder input gives every image in it, to the same names in the
/// output folder.
fn apply_jobs(input: &Path, output: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    if !input.is_dir() {
        if ImageKind::from_path(output).is_none() {
            bail!(
                "{}: output must end in .png, .jpg or .jpeg",
                output.display()
            );
        }
        return Ok(vec![(input.to_path_buf(), output.to_path_buf())]);
    }
    if output.exists() && !output.is_dir() {
        bail!(
            "{}: input is a folder, so the output must be a folder",
            output.display()
        );
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(input)
        .with_context(|| format!("{}: cannot list folder", input.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_image(p))
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("{}: no PNG or JPEG images in the folder", input.display());
    }
    Ok(v.into_iter()
        .map(|p| {
            let o = output.join(p.file_name().unwrap_or_default());
            (p, o)
        })
        .collect())
}

/// Creates `dir` and its missing parents; returns those it made, innermost first.
fn create_dirs(dir: &Path) -> takumi::Result<Vec<PathBuf>> {
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(dir).map_err(|e| Error::Output {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    Ok(missing)
}

fn templates(cfg: &Config, cmd: TemplatesCmd) -> anyhow::Result<()> {
    let store = TemplateStore::open(&cfg.store.dir)?;
    match cmd {
        TemplatesCmd::List => {
            for (name, t) in store.list()? {
                match t {
                    Ok(t) => println!(
                        "{name}\tpairs {}\tself-PSNR {:.2} dB\tmodel {}\tcreated {}",
                        t.card.pairs, t.card.self_psnr_db, t.model_hash, t.created_unix
                    ),
                    Err(e) => println!("{name}\tUNREADABLE: {e}"),
                }
            }
        }
        TemplatesCmd::Show { name } => {
            let t = store.load(&TemplateName::new(&name)?)?;
            let c = &t.card;
            println!("name         {}", t.name);
            println!("model        {}", t.model_hash);
            println!("created      {} (unix)", t.created_unix);
            for (i, s) in t.sources.iter().enumerate() {
                println!(
                    "pair {i}       {} before {} after {}",
                    s.size_text(),
                    // by characters: a crafted file may hold any UTF-8 there
                    s.before_blake3.chars().take(16).collect::<String>(),
                    s.after_blake3.chars().take(16).collect::<String>()
                );
            }
            println!("exposure     {:+.2} EV", c.exposure_ev);
            println!(
                "white bal.   R/G {:+.3}, B/G {:+.3} (log2)",
                c.wb_shift[0], c.wb_shift[1]
            );
            let ratios = [
                ("contrast", c.contrast),
                ("saturation", c.saturation),
                ("sharpness", c.sharpness),
            ];
            for (what, v) in ratios {
                println!("{what:<13}{}", card::ratio_text(v, RatioStyle::Full));
            }
            println!(
                "self-PSNR    {:.2} dB (G(template, before) against after)",
                c.self_psnr_db
            );
            println!(
                "closed-form  {}",
                if c.fit_used { "used" } else { "not used" }
            );
            println!("validated    {}", c.validation_summary());
            let g = &c.part_gains_db;
            println!(
                "parts        hypernet {:+.2} dB, tone {:+.2} dB, bank {:+.2} dB, position {:+.2} dB; the bank's blurs {:+.2} dB",
                g.hypernet, g.tone, g.bank, g.position, g.blurs
            );
            println!("apply        {}", apply_passes(&t.residual));
            if let Some(r) = c.reverse_gain_db {
                println!("undo         {r:+.2} dB over doing nothing (validated)");
            }
            if let Some(r) = c.round_trip_db {
                let kept = if c.round_trip_failed() {
                    "worse than nothing: the undo is the identity"
                } else {
                    "kept"
                };
                println!(
                    "round trip   the undo brings the edited after shot in every hue {r:+.2} dB closer than doing nothing: {kept}"
                );
            }
            for (i, r) in c.registration.iter().enumerate() {
                println!(
                    "register {i}   {} shift ({:+.1}, {:+.1}) px, rotation {:+.2} deg, scale x{:.3}, residual {:.2} px",
                    if r.registered { "ok" } else { "FAILED" },
                    r.dx,
                    r.dy,
                    r.angle_deg,
                    r.scale,
                    r.residual_px
                );
            }
        }
        TemplatesCmd::Rm { name } => {
            store.remove(&TemplateName::new(&name)?)?;
            println!("removed {name}");
        }
    }
    Ok(())
}

/// What `apply` runs for a template's residual weights: G alone, or G and the passes after it.
fn apply_passes(residual: &[f32]) -> String {
    let stages = takumi::engine::bank::stages(residual);
    match (residual.is_empty(), stages.is_empty()) {
        (true, _) => "G alone".into(),
        (false, true) => "G alone (the residual stage folded into its grid)".into(),
        (false, false) => format!("G, then the residual stage's {}", stages.join(", ")),
    }
}
