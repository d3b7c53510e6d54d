"""Presets and stage settings. A preset is a full Config; command-line flags override fields."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field

from crawl2chat.common import C2CError


@dataclass
class WorldConfig:
    seed: int = 1337
    n_known: int = 300            # people in the pretraining corpus, split into "half" A and "half" B
    known_a_share: float = 0.8    # share in half A, the people chat data may talk about; half B only pretraining sees
    n_search_only: int = 600      # pages only in the search index (their own random stream)
    n_unknown: int = 100          # nowhere
    n_towns: int = 40
    n_companies: int = 40
    n_math_pages: int = 250       # worked arithmetic in prose
    n_problems_train: int = 2000  # word problems with integer answers
    n_problems_test: int = 200
    n_bignum_train: int = 4000    # large-number problems that need the Python tool
    n_bignum_test: int = 100
    val_fraction: float = 0.1     # share of town/company/math pages held out for val loss / bits per byte


@dataclass
class DataConfig:
    inputs: list = field(default_factory=list)  # WARC / JSONL / parquet files or folders of .html; [] = the world's crawl
    workers: int = 1              # datatrove local executor tasks
    languages: list = field(default_factory=lambda: ["en"])
    language_threshold: float = 0.65
    minhash: bool = True          # near-duplicate removal
    pii: bool = True              # mask emails, phone numbers, IP addresses
    val_fraction: float = 0.0     # share of clean documents held out for val loss when no val URL list is given
    quality: dict = field(default_factory=dict)  # per-filter keyword overrides of datatrove's (FineWeb's) thresholds
    seed: int = 0


# The world's pages are short templated encyclopedia entries: every sentence names its subject in full,
# town pages have four sentences, math pages are mostly equations. FineWeb's thresholds, made for the
# web, remove nearly all of them (measured: 3.5% kept), so the world presets relax exactly those checks;
# each junk category is still removed (data.junk_removed in report.json).
WORLD_QUALITY = {
    "gopher_repetition": {"top_n_grams": [[2, 0.5], [3, 0.45], [4, 0.4]],
                          "dup_n_grams": [[5, 0.6], [6, 0.58], [7, 0.56], [8, 0.54], [9, 0.52], [10, 0.5]]},
    "gopher_quality": {"min_doc_words": 15, "max_non_alpha_words_ratio": 0.5, "min_stop_words": 1},
    "c4": {"min_num_sentences": 2},
}


@dataclass
class TokenizerConfig:
    vocab_size: int = 2048
    max_digits: int = 3           # numbers are pre-split into groups of at most this many digits


@dataclass
class ModelConfig:
    depth: int = 4
    aspect_ratio: int = 64        # width = depth * aspect_ratio (rounded up to a multiple of head_dim)
    head_dim: int = 64
    seq_len: int = 256
    vocab_size: int = 0           # filled from the tokenizer


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 16          # sequences per micro-batch per process
    grad_accum: int = 1
    batch_tokens: int = 0         # tokens per optimizer step over all processes; sets grad_accum (0 = use grad_accum)
    lr: float = 5e-3
    min_lr_frac: float = 0.0
    warmup_steps: int = 20
    schedule: str = "wsd"         # "wsd" (warmup-stable-decay) or "cosine"
    decay_frac: float = 0.3       # share of steps spent decaying in wsd
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    optimizer: str = "adamw"      # "adamw" or "muon" (Muon for hidden matrices, AdamW for the rest)
    dtype: str = "auto"           # "auto", "fp32" or "bf16" (autocast)
    compile: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    log_every: int = 1
    seed: int = 0


@dataclass
class ChatDataConfig:
    extra: list = field(default_factory=list)  # chat JSONL files in the OpenAI `messages` format
    oasst: str = ""               # an OpenAssistant message-tree JSONL to import
    val_fraction: float = 0.05    # held-out conversations for the SFT val loss
    max_math: int = 1000          # worked word problems from the world (the rest are for RL)
    fact_phrasings: int = 1       # distinct question phrasings per known_a person and attribute
    probe_holdout: int = 0        # known_a people in no chat (at most a third), probed first by idk: known from pretraining only
    open_ended: int = 400         # open-ended requests with reference replies (the prompts RLHF trains on)
    corrections: str = ""         # a review file of expert corrections (c2c correct) to train on
    corrections_weight: int = 3   # times each correction is repeated in the SFT mix
    oracle_rounds: int = 1        # world runs: rounds of oracle corrections after SFT (0 = none; 1 at most)
    correction_steps: int = 40    # at most this many steps in a correction round (one pass over its rows)
    correction_replay: int = 8    # SFT conversations replayed per correction in the round
    correction_lr: float = 3e-4
    seed: int = 0


@dataclass
class IDKConfig:
    questions: list = field(default_factory=list)  # extra {question, answer, source?} JSONL files to probe
    # known_a people probed (× 5 attributes), chat_data.probe_holdout's first; 0 = none. All 240: the
    # invented names recombine their name parts, so more surnames are seen both answered and refused
    # (half B's questions whose surname no probed person bears were refused 0.30 of the time, the rest
    # 0.08; hallucination on every held-out question 0.152 at 100 people, 0.112 at 240, 0.092 with m=1)
    probe_people: int = 240
    k: int = 4                    # sampled answers per probed question
    m: int = 1                    # known when at least m of the k are right
    temperature: float = 0.3      # probe sampling, near the greedy decoding of the evals (idk.probe)
    max_new_tokens: int = 24      # per probe sample (a fact sentence is about 15 tokens)
    unknown_train: float = 0.5    # share of unknown people trained on (the rest are held out)
    invented_people: int = 4400   # extra "I don't know" questions about names no person has
    invented_search: int = 300    # tools-on questions about further invented names: search, find nobody
    invented_found: int = 3600    # tools-on questions about further invented names, a result made up for each: copy it (README, section 6)
    invented_from: str = "probe"  # whose name parts invented names recombine: probe, known_a or all (idk.build_mix)
    search_train: float = 0.5     # share of search-only people trained on (the rest are held out)
    known_search: int = 100       # tools-on fact questions about known_a people (they search too)
    n_bignum: int = 3000          # bignum_train problems solved with Python (0 = all)
    n_word_python: int = 200      # word problems (problems_train) worked with a Python call per step
    replay: float = 0.2           # share of SFT conversations in the training mix
    honesty_weight: int = 3       # times each tools-off conversation (answer or abstain) is in the mix
    pretrain_share: float = 0.2   # share of training rows that are pretraining text (loss on every token): keeps what it stored
    surprisal_input: bool = True  # the model reads its own surprisal at each user token (GPT.input_surprisal)
    # read it from the SFT model as it was, in training and in use: a frozen copy saved with the model
    # (GPT.surprisal_model). Reading its own surprisal in use instead: hallucination 0.12 against 0.044
    # on every held-out question, known accuracy 0.760 against 0.763 (the same weights)
    frozen_surprisal: bool = True
    # the evals take every held-out question by default: they come five to a person and one name decides
    # all five, so 100 questions are 20 people (measured: the first 100 gave hallucination 0.11, all 250 0.168)
    eval_unknown: int = 0         # held-out unknown-people questions for halluc_rate; 0 = all
    eval_people: int = 0          # known_b people for known_acc (× 5 attributes); 0 = all
    # the abstention threshold (idk.calibrate_abstention): the highest at which at most this share of
    # questions about calib_names fresh invented names get an answer; 0 = no threshold (plain greedy).
    # 0.10 is the bound the evals hold hallucination to; 500 names gave 0.072 and 0.106 answered
    # without a threshold in two draws, 2000 gave 0.080
    halluc_budget: float = 0.10
    calib_names: int = 2000
    eval_fresh: int = 500         # questions about fresh invented names for halluc_rate_fresh (idk.fresh_name_questions); 0 = none
    eval_search: int = 200        # held-out search-only questions evaluated with tools (60 gave ±0.06)
    eval_bignum: int = 50         # bignum_test problems evaluated
    val_fraction: float = 0.05
    seed: int = 0


def _idk_train() -> "TrainConfig":
    return TrainConfig(steps=800, batch_size=16, lr=5e-4, warmup_steps=5, decay_frac=0.5,
                       eval_every=50, eval_batches=4, ckpt_every=50)


@dataclass
class RMConfig:
    init: str = ""                # chat model folder the RM starts from; "" = the run's rl model, else sft
    pairs: list = field(default_factory=list)  # preference JSONL files; [] with no hh = the world's pairs
    hh: str = ""                  # an HH-RLHF {chosen, rejected} transcript file (.jsonl or .jsonl.gz)
    max_pairs: int = 0            # cap on pairs read from files (0 = all)
    heldout_fraction: float = 0.1  # file pairs held out for rm_acc
    n_prompts: int = 500          # world: open-ended prompts whose sampled replies make labelled pairs
    samples_per_prompt: int = 4   # world: replies sampled per prompt
    # world: label every pair of a prompt's replies (a labeller ranks them), not two by two: 3× the labels
    # for +0.01 held-out accuracy (0.806 → 0.816 on 315 pairs), beyond the few hundred a person labels
    all_pairs: bool = False
    n_heldout: int = 100          # world: held-out prompts (other entities) → rubric-labelled pairs
    noise: float = 0.1            # world: share of training labels flipped (human disagreement)
    margin: float = 0.05          # world: pairs whose rubric scores differ by less are ties, dropped
    max_new_tokens: int = 64
    temperature: float = 1.0
    surprisal_input: bool = True  # the RM reads its own surprisal at every token (a made-up fact is unlikely)
    # score += this × the reply's mean log-probability under the frozen chat model (RewardModel.reply_logp);
    # 0 = the head alone. At 1.0 held-out accuracy rose 0.67 → 0.78 (three seeds each), but RLHF gained no
    # more gold and the term anchors the policy to the start, like a KL penalty (README, section 8). At 4
    # with rm_train.lr=3e-5: 0.843-0.850 over three seeds (0.766 without), and 300 unguarded steps no longer hack it
    likelihood_weight: float = 0.0
    seed: int = 0


def _rm_train() -> "TrainConfig":
    return TrainConfig(steps=100, batch_size=16, lr=3e-4, warmup_steps=5, decay_frac=0.3, eval_every=20,
                       ckpt_every=20, grad_clip=1.0)


@dataclass
class RLHFConfig:
    init: str = ""                # policy start; "" = the run's rl model, else sft
    rm: str = "rm"                # the reward model folder
    prompts_per_step: int = 8
    group_size: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    beta: float = 0.05            # KL penalty to the starting policy (--kl)
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    scale_std: bool = True
    guard: bool = True            # --no-guard: train all steps, keep the last weights
    eval_prompts: int = 24        # held-out prompts the guard watches
    eval_samples: int = 2         # replies per held-out prompt and evaluation
    final_samples: int = 4        # replies per held-out prompt for gold_before/gold_after
    # held-out prompts for gold_before/gold_after (0 = all, about rm.n_heldout): more than the guard's
    # eval_prompts, so the interval is narrower and most prompts played no part in picking the weights
    final_prompts: int = 0
    patience: int = 2             # M: evaluations in a row of proxy up / gold down before stopping
    margin: float = 0.01          # gold must be this far below its peak to count as falling
    # ... and this many standard errors of the per-prompt paired difference: at 1.0 the guard stopped
    # on dips the next evaluation undid (step 25 of a run whose gold peaked at step 170)
    noise_z: float = 2.0
    kl_budget: float = 10.0       # nats per reply
    n_adversarial: int = 20
    seed: int = 0


def _rlhf_train() -> "TrainConfig":
    # 150: gold rose past step 90 (kept step 100: +0.027 on fresh samples, 95% CI +0.001 to +0.055);
    # at 30 steps it had not moved (-0.004, -0.025 to +0.019)
    return TrainConfig(steps=150, batch_size=0, lr=1e-4, warmup_steps=3, decay_frac=0.2, eval_every=5,
                       ckpt_every=10, grad_clip=1.0)


@dataclass
class GRPOConfig:
    init: str = ""                # model folder RL starts from; "" = the run's idk model, else its sft model
    problems: list = field(default_factory=list)  # {question, answer} JSONL files; [] = the world's train problems
    test_problems: str = ""       # held-out problems; "" = the world's test problems
    eval_problems: int = 200      # held-out problems used for pass@1/pass@k (0 = all)
    prompts_per_step: int = 16    # problems per rollout batch (per process)
    group_size: int = 8           # completions sampled per problem (G)
    max_new_tokens: int = 96
    temperature: float = 1.0
    inner_steps: int = 1          # optimiser steps per rollout batch (μ); >1 uses the clipped ratio
    epsilon: float = 0.2          # clip range below 1
    epsilon_high: float = 0.28    # clip range above 1 (DAPO's clip-higher)
    beta: float = 0.0             # KL penalty to the starting model (0: logged, not optimised)
    kl_stride: int = 4            # with beta 0, the reference scores every kl_stride-th rollout (the logged
    #                               KL is an estimate over those; one forward pass in four instead of four)
    scale_std: bool = True        # divide advantages by the group's std (Dr. GRPO: False)
    neg_weight: float = 1.0       # × the advantages below zero (< 1 leans on the right replies: sharper pass@1)
    format_reward: float = 0.1    # for ending with "The answer is N." and the end token
    brevity_reward: float = 0.1   # × the unused share of the token budget, correct answers only
    pass_k: int = 8
    tools: bool = True            # the python tool in rollouts and evals (the system message the idk stage
    #                               taught tools with); its outputs are in the context, never in the loss
    seed: int = 0


def _rl_train() -> "TrainConfig":
    # 1e-4: on an idk model that calls Python on every problem, 2e-4 lowered pass@1 (0.700 → 0.650), and 3e-4
    # lowered it to 0.595 in 10 steps. 100 steps: on one idk model pass@1 went 0.655 → 0.800 (0.670 at step
    # 40, 0.790 at step 80), where 40 steps had ended at 0.685
    return TrainConfig(steps=100, batch_size=0, lr=1e-4, warmup_steps=5, schedule="wsd", decay_frac=0.2,
                       eval_every=10, ckpt_every=50, grad_clip=1.0)


def _sft_train() -> "TrainConfig":
    # 5e-4: fact answers about people no chat mentions need what pretraining stored; on one base model,
    # sft.fact_qa_acc (before corrections) was 0.717 at 2.5e-4, 0.81 at 5e-4, 0.807 at 7e-4, 0.747 at 1e-3,
    # 0.60 at 2e-3; on another world's base model 0.767 at 5e-4 against 0.737 at 1e-3
    return TrainConfig(steps=150, batch_size=16, lr=5e-4, warmup_steps=10, decay_frac=0.5,
                       eval_every=50, eval_batches=4, ckpt_every=50)


@dataclass
class Config:
    preset: str = "tiny"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    chat_data: ChatDataConfig = field(default_factory=ChatDataConfig)
    sft: TrainConfig = field(default_factory=_sft_train)
    idk: IDKConfig = field(default_factory=IDKConfig)
    idk_train: TrainConfig = field(default_factory=_idk_train)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rl: TrainConfig = field(default_factory=_rl_train)
    rm: RMConfig = field(default_factory=RMConfig)
    rm_train: TrainConfig = field(default_factory=_rm_train)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    rlhf_train: TrainConfig = field(default_factory=_rlhf_train)

    def to_dict(self) -> dict:
        return asdict(self)


def _tiny() -> Config:
    c = Config(preset="tiny")
    c.data = DataConfig(quality=WORLD_QUALITY)
    # torch.compile where every batch has the same shape (packed rows): 1.2–1.3× fp32 eager tokens/s on
    # the 2-core development CPU (c2c bench train); RL, RM and RLHF batches are ragged and stay eager
    for tc in (c.pretrain, c.sft, c.idk_train):
        tc.compile = True
    return c


def _smoke() -> Config:
    c = Config(preset="smoke")
    c.world = WorldConfig(n_known=20, n_search_only=6, n_unknown=6, n_towns=8, n_companies=8,
                          n_math_pages=20, n_problems_train=40, n_problems_test=10,
                          n_bignum_train=10, n_bignum_test=5, val_fraction=0.05)
    c.data = DataConfig(quality=WORLD_QUALITY)
    c.tokenizer = TokenizerConfig(vocab_size=512)
    c.model = ModelConfig(depth=2, aspect_ratio=32, head_dim=32, seq_len=64)
    c.pretrain = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=10,
                             eval_batches=2, ckpt_every=10, dtype="fp32")
    c.chat_data = ChatDataConfig(max_math=20, correction_steps=2)
    c.sft = TrainConfig(steps=10, batch_size=8, lr=1e-3, warmup_steps=2, eval_every=5, eval_batches=2,
                        ckpt_every=5, dtype="fp32")
    c.idk = IDKConfig(probe_people=3, k=2, m=1, known_search=3, n_bignum=3, n_word_python=5, invented_people=3,
                      invented_search=3, invented_found=3, eval_unknown=3, eval_people=2, eval_search=3, eval_bignum=2)
    c.idk_train = TrainConfig(steps=3, batch_size=4, lr=1e-4, warmup_steps=1, eval_every=3, eval_batches=1,
                              ckpt_every=3, dtype="fp32")
    c.grpo = GRPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=24, eval_problems=6, pass_k=2)
    c.rl = TrainConfig(steps=4, batch_size=0, lr=1e-4, warmup_steps=1, eval_every=2, ckpt_every=2, dtype="fp32")
    c.rm = RMConfig(n_prompts=40, n_heldout=10, max_new_tokens=16)
    c.rm_train = TrainConfig(steps=6, batch_size=8, lr=3e-4, warmup_steps=1, eval_every=3, ckpt_every=3, dtype="fp32")
    c.rlhf = RLHFConfig(prompts_per_step=4, group_size=2, max_new_tokens=16, eval_prompts=6, eval_samples=2,
                        final_samples=2)
    c.rlhf_train = TrainConfig(steps=4, batch_size=0, lr=1e-4, warmup_steps=1, eval_every=2, ckpt_every=2,
                               dtype="fp32")
    return c


def _gpu_d12() -> Config:
    c = Config(preset="gpu-d12")
    c.data = DataConfig(quality=WORLD_QUALITY, workers=8)
    c.world = WorldConfig(n_known=5000, n_search_only=500, n_unknown=1000, n_towns=300, n_companies=300,
                          n_math_pages=20000, n_problems_train=20000, n_problems_test=500)
    c.tokenizer = TokenizerConfig(vocab_size=32768)
    c.model = ModelConfig(depth=12, aspect_ratio=64, head_dim=128, seq_len=1024)  # 128: +1.5 MFU points on an H200
    c.pretrain = TrainConfig(steps=5000, batch_size=32, batch_tokens=2**19, lr=1e-3, warmup_steps=200,
                             dtype="bf16", compile=True, eval_every=500, ckpt_every=1000)
    return c


def _gpu_d20() -> Config:
    c = _gpu_d12()
    c.preset = "gpu-d20"
    c.model = ModelConfig(depth=20, aspect_ratio=64, head_dim=128, seq_len=2048)
    c.pretrain.batch_size = 16
    return c


PRESETS = {"tiny": _tiny, "smoke": _smoke, "gpu-d12": _gpu_d12, "gpu-d20": _gpu_d20}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise C2CError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def from_dict(d: dict) -> Config:
    def build(cls, sub):
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in sub.items() if k in names}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)
    return Config(preset=d.get("preset", "custom"), world=build(WorldConfig, d.get("world", {})),
                  data=build(DataConfig, d.get("data", {})),
                  tokenizer=build(TokenizerConfig, d.get("tokenizer", {})),
                  model=build(ModelConfig, d.get("model", {})),
                  pretrain=build(TrainConfig, d.get("pretrain", {})),
                  chat_data=build(ChatDataConfig, d.get("chat_data", {})),
                  sft=build(TrainConfig, d["sft"]) if "sft" in d else _sft_train(),
                  idk=build(IDKConfig, d.get("idk", {})),
                  idk_train=build(TrainConfig, d["idk_train"]) if "idk_train" in d else _idk_train(),
                  grpo=build(GRPOConfig, d.get("grpo", {})),
                  rl=build(TrainConfig, d["rl"]) if "rl" in d else _rl_train(),
                  rm=build(RMConfig, d.get("rm", {})),
                  rm_train=build(TrainConfig, d["rm_train"]) if "rm_train" in d else _rm_train(),
                  rlhf=build(RLHFConfig, d.get("rlhf", {})),
                  rlhf_train=build(TrainConfig, d["rlhf_train"]) if "rlhf_train" in d else _rlhf_train())


def fingerprint(*parts) -> str:
    """A short hash of configuration pieces; a stage is reused only when its fingerprint matches."""
    blob = json.dumps([asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
