# Peer for tests/bench/e2e_bench.sh: the same GPT-2 training step in PyTorch (bf16 autocast, SDPA,
# fused AdamW, clip 1.0), eager and torch.compile. Prints one CSV line per mode:
# impl,B,T,ms_per_step,tokens_per_s,peak_gib. From ../shared/peers/torch_gpt2.py, timed with events
# (median step of 20 after 5 warm-up steps).
import math, sys, time, torch, torch.nn as nn, torch.nn.functional as F
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

class Block(nn.Module):
    def __init__(s, C, H):
        super().__init__(); s.H = H
        s.ln1 = nn.LayerNorm(C); s.qkv = nn.Linear(C, 3 * C); s.proj = nn.Linear(C, C)
        s.ln2 = nn.LayerNorm(C); s.fc = nn.Linear(C, 4 * C); s.fc2 = nn.Linear(4 * C, C)
    def forward(s, x):
        B, T, C = x.shape
        q, k, v = s.qkv(s.ln1(x)).split(C, dim=2)
        q, k, v = [t.view(B, T, s.H, C // s.H).transpose(1, 2) for t in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + s.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + s.fc2(F.gelu(s.fc(s.ln2(x)), approximate="tanh"))

class GPT(nn.Module):
    def __init__(s, V=50304, T=1024, L=12, C=768, H=12):
        super().__init__()
        s.wte = nn.Embedding(V, C); s.wpe = nn.Embedding(T, C)
        s.blocks = nn.ModuleList([Block(C, H) for _ in range(L)]); s.lnf = nn.LayerNorm(C)
        for p in s.parameters():
            if p.dim() == 2: nn.init.normal_(p, std=0.02)
    def forward(s, idx, tgt):
        x = s.wte(idx) + s.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in s.blocks: x = b(x)
        logits = F.linear(s.lnf(x), s.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.view(-1))

def run(compile_, B, T, L=12, C=768, H=12, steps=20):
    torch.manual_seed(0)
    m = GPT(T=T, L=L, C=C, H=H).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=6e-4, fused=True)
    f = torch.compile(m) if compile_ else m
    x = torch.randint(0, 50257, (B, T), device="cuda"); y = torch.randint(0, 50257, (B, T), device="cuda")
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = f(x, y)
        loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    for _ in range(5): step()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); loss = step(); b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b) / 1e3)
    dt = sorted(times)[len(times) // 2]
    nparams = sum(p.numel() for p in m.parameters())
    flops = 6 * nparams * B * T + 12 * L * C * T * B * T / 2 * 1  # causal attention approx
    print(f"torch_{'compile' if compile_ else 'eager'},{B},{T},{dt*1e3:.2f},{B*T/dt:.0f},{torch.cuda.max_memory_allocated()/2**30:.2f}", flush=True)
    del m, opt, f; torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()

if __name__ == "__main__":
    B = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    for comp in (False, True):
        run(comp, B=B, T=T)
