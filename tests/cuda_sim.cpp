// The CUDA kernels run on the CPU: CUDA's built-ins defined as plain host code, and launchers
// that walk every block and thread of the grid in turn, with the same launch planning
// (rotary_plan, apply_rotary_plan). The kernels use no shared memory and no barriers, so this
// computes what the GPU computes provided no two threads touch one element; the RK_SIM_* hooks
// check what sequential CPU threads would hide:
//   - alignment of every 16-byte vector access (x86 tolerates misalignment, the GPU faults);
//   - bounds: every read lies inside an input tensor, every write inside an output;
//   - races: no element written by two threads, and no element read by one thread and written
//     by another in the same launch (in place), recorded per launch;
// and the plans themselves (plan_launch) are exposed so that shapes too large to allocate can
// be planned. Built by tests/test_cuda_sim.py.
#include <torch/extension.h>

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

namespace sim {
struct Dim3 {
  int64_t x = 0, y = 0, z = 0;
};

struct Tracker {
  bool on = false;
  int64_t thread = 0;  // global id of the running thread
  std::vector<std::pair<uintptr_t, uintptr_t>> reads, writes;  // allowed [lo, hi)
  std::map<uintptr_t, int64_t> writer, reader;                 // byte -> thread (first seen)

  static bool inside(const std::vector<std::pair<uintptr_t, uintptr_t>>& r, uintptr_t p, size_t n) {
    for (const auto& [lo, hi] : r) {
      if (p >= lo && p + n <= hi) return true;
    }
    return false;
  }
  void read(const void* ptr, size_t n) {
    if (!on) return;
    const auto p = reinterpret_cast<uintptr_t>(ptr);
    TORCH_CHECK(inside(reads, p, n) || inside(writes, p, n), "rotary (CUDA simulation): read of ", n,
                " bytes outside every input tensor by thread ", thread);
    for (size_t i = 0; i < n; ++i) {
      const auto w = writer.find(p + i);
      TORCH_CHECK(w == writer.end() || w->second == thread, "rotary (CUDA simulation): race: thread ", thread,
                  " reads an element thread ", w->second, " wrote");
      reader.emplace(p + i, thread);
    }
  }
  void write(const void* ptr, size_t n) {
    if (!on) return;
    const auto p = reinterpret_cast<uintptr_t>(ptr);
    TORCH_CHECK(inside(writes, p, n), "rotary (CUDA simulation): write of ", n,
                " bytes outside every output tensor by thread ", thread);
    for (size_t i = 0; i < n; ++i) {
      const auto [w, fresh] = writer.emplace(p + i, thread);
      TORCH_CHECK(fresh || w->second == thread, "rotary (CUDA simulation): race: threads ", w->second, " and ",
                  thread, " write one element");
      const auto r = reader.find(p + i);
      TORCH_CHECK(r == reader.end() || r->second == thread, "rotary (CUDA simulation): race: thread ", thread,
                  " writes an element thread ", r->second, " read");
    }
  }
};
Tracker tracker;

void add_range(std::vector<std::pair<uintptr_t, uintptr_t>>& r, const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return;
  const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  r.emplace_back(lo, lo + span * t.element_size());
}
}  // namespace sim
static sim::Dim3 blockIdx, threadIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define RK_SIM_READ(ptr, bytes) sim::tracker.read(ptr, bytes)
#define RK_SIM_WRITE(ptr, bytes) sim::tracker.write(ptr, bytes)
#define RK_SIM_ALIGNED(ptr, bytes)                                                                    \
  TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % (bytes) == 0, "rotary (CUDA simulation): ", (bytes), \
              "-byte vector access at a misaligned address")

#include "rotary_cuda_kernels.cuh"

using namespace rotary_kernels;

namespace {

bool g_check = true;       // bounds and race checks (alignment is always checked)
bool g_force_vector = false;  // test hook: launch the vector instance whatever the plan says

template <typename F>
void walk(LaunchShape grid, LaunchShape block, F&& thread_fn) {
  gridDim = {grid.x, grid.y, 1};
  blockDim = {block.x, block.y, 1};
  sim::tracker.on = g_check;
  sim::tracker.writer.clear();
  sim::tracker.reader.clear();
  for (int64_t by = 0; by < grid.y; ++by)
    for (int64_t bx = 0; bx < grid.x; ++bx)
      for (int64_t ty = 0; ty < block.y; ++ty)
        for (int64_t tx = 0; tx < block.x; ++tx) {
          blockIdx = {bx, by, 0};
          threadIdx = {tx, ty, 0};
          sim::tracker.thread = ((by * grid.x + bx) * block.y + ty) * block.x + tx;
          thread_fn();
        }
  sim::tracker.on = false;
}

struct SimLauncher {
  std::vector<int64_t> info;  // grid.x, grid.y, block.x, block.y, VEC, VECTOR, CS_VECTOR, PAIRS, max threads
  template <int VEC, bool VECTOR, bool CS_VECTOR, bool INTERLEAVED, bool K_TABLES, bool PAIRS = false,
            typename Params>
  void run(const Params& p, LaunchShape grid, LaunchShape block) {
    using scalar_t = typename Params::scalar_type;
    using cs_t = typename Params::cs_type;
    constexpr int most = block_threads<scalar_t, cs_t>(CS_VECTOR, INTERLEAVED);  // (a real launch past
    // the instance's __launch_bounds__ fails)
    TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.x * block.y <= most, "bad block ", block.x, "x", block.y);
    TORCH_CHECK(grid.x >= 1 && grid.x <= 2147483647 && grid.y >= 1 && grid.y <= 65535, "bad grid");
    info = {grid.x, grid.y, block.x, block.y, VEC, VECTOR, CS_VECTOR, PAIRS, most};
    walk(grid, block, [&] { rotary_kernel<scalar_t, cs_t, VEC, VECTOR, CS_VECTOR, INTERLEAVED, K_TABLES, PAIRS>(p); });
  }
  template <int VEC, bool VECTOR, bool ROWS32, typename scalar_t, typename acc_t>
  void run_elementwise(const Elementwise<scalar_t, acc_t>& e, const ElementwisePlan& plan) {
    TORCH_CHECK(plan.block.x * plan.block.y <= kThreads && plan.grid.x >= 1 && plan.grid.x <= 2147483647, "bad plan");
    info = {plan.grid.x, plan.grid.y, plan.block.x, plan.block.y, VEC, VECTOR, 0, 0};
    walk(plan.grid, plan.block, [&] { apply_rotary_kernel<scalar_t, acc_t, VEC, VECTOR, ROWS32>(e, plan.rows); });
  }
};

// Wraps the real launcher for tests of the alignment hook: a misaligned tensor would be
// planned for the scalar path; this sends it to the vector instance anyway.
struct ForceVector : SimLauncher {
  template <int VEC, bool VECTOR, bool CS_VECTOR, bool INTERLEAVED, bool K_TABLES, bool PAIRS = false,
            typename Params>
  void run(const Params& p, LaunchShape grid, LaunchShape block) {
    constexpr int V = 16 / sizeof(typename Params::scalar_type);
    if constexpr (PAIRS) {  // (chunks of pairs: nothing to force)
      SimLauncher::run<VEC, VECTOR, CS_VECTOR, INTERLEAVED, K_TABLES, PAIRS>(p, grid, block);
      return;
    }
    SimLauncher::run<V, true, false, INTERLEAVED, K_TABLES>(p, {grid.x, grid.y},
                                                             {std::max<int64_t>(1, block.x / V), block.y});
  }
};

void set_ranges(std::initializer_list<at::Tensor> in, std::initializer_list<at::Tensor> out) {
  sim::tracker.reads.clear();
  sim::tracker.writes.clear();
  for (const auto& t : in) sim::add_range(sim::tracker.reads, t);
  for (const auto& t : out) sim::add_range(sim::tracker.writes, t);
}

// Same contract as the rotary op (shapes already valid); returns the launch it made.
std::vector<int64_t> rotary_sim(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                                bool interleaved, bool conj, int64_t sms,
                                const std::optional<at::Tensor>& positions = std::nullopt,
                                const std::optional<at::Tensor>& cu_seqlens = std::nullopt,
                                const std::optional<at::Tensor>& seqlen_offsets = std::nullopt, int64_t offset = 0,
                                std::vector<int64_t> mrope_section = {}, bool mrope_interleaved = false,
                                const std::optional<at::Tensor>& cos_k = std::nullopt,
                                const std::optional<at::Tensor>& sin_k = std::nullopt, bool pair_tables = false,
                                bool swap_layout = false) {
  const TokenIndexArgs ix{positions, cu_seqlens, seqlen_offsets, offset, mrope_section, mrope_interleaved};
  SimLauncher plain;
  ForceVector forced;
  const SimLauncher& launcher = g_force_vector ? static_cast<const SimLauncher&>(forced) : plain;
  dispatch_rotary_types(q, cos, sin, cos_k, sin_k,
                        [&](auto x_tag, auto cs_tag, const at::Tensor& c, const at::Tensor& s, const at::Tensor& ck,
                            const at::Tensor& sk) {
    const auto t = shared_table_strides(c, s, ck, sk);
    set_ranges({q, k.value_or(at::Tensor()), t[0], t[1], t[2], t[3]}, {q_out, k_out.value_or(at::Tensor())});
    if (g_force_vector) {
      rotary_plan<decltype(x_tag), decltype(cs_tag)>(q, k, t[0], t[1], q_out, k_out, interleaved, conj, ix, sms, forced,
                                                     t[2], t[3], pair_tables, swap_layout);
    } else {
      rotary_plan<decltype(x_tag), decltype(cs_tag)>(q, k, t[0], t[1], q_out, k_out, interleaved, conj, ix, sms, plain,
                                                     t[2], t[3], pair_tables, swap_layout);
    }
  });
  return launcher.info;
}

// flash-attn's apply_rotary through the CUDA launch planning (cos/sin already expanded to x1).
std::vector<int64_t> apply_rotary_sim(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& out1, const at::Tensor& out2,
                                      bool conj) {
  // The math-type tables dispatch_elementwise would make (it then converts nothing), so their
  // memory is known to the bounds check.
  const at::Tensor c = elementwise_table(x1, cos), s = elementwise_table(x1, sin);
  SimLauncher launcher;
  set_ranges({x1, x2, c, s}, {out1, out2});
  dispatch_elementwise(x1, x2, c, s, out1, out2, conj, [&](const auto& e) { apply_rotary_plan(e, launcher); });
  return launcher.info;
}

// The tables dispatch_elementwise hands the kernels (math type, broadcast kept as zero strides).
std::vector<at::Tensor> elementwise_tables(const at::Tensor& x1, const at::Tensor& cos, const at::Tensor& sin) {
  return {elementwise_table(x1, cos), elementwise_table(x1, sin)};
}

std::vector<int64_t> plan(int64_t tokens, int64_t rows, int64_t nchunks, int64_t sms, int64_t max_threads) {
  const LaunchPlan p = plan_launch(tokens, rows, nchunks, sms, max_threads);
  return {p.grid.x, p.grid.y, p.block.x, p.block.y, p.rows_per_slice};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotary_sim", &rotary_sim, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("cos"), pybind11::arg("sin"),
        pybind11::arg("q_out"), pybind11::arg("k_out"), pybind11::arg("interleaved"), pybind11::arg("conj"),
        pybind11::arg("sms"), pybind11::arg("positions") = pybind11::none(),
        pybind11::arg("cu_seqlens") = pybind11::none(), pybind11::arg("seqlen_offsets") = pybind11::none(),
        pybind11::arg("offset") = 0, pybind11::arg("mrope_section") = std::vector<int64_t>{},
        pybind11::arg("mrope_interleaved") = false, pybind11::arg("cos_k") = pybind11::none(),
        pybind11::arg("sin_k") = pybind11::none(), pybind11::arg("pair_tables") = false,
        pybind11::arg("swap_layout") = false);
  m.def("apply_rotary_sim", &apply_rotary_sim);
  m.def("elementwise_tables", &elementwise_tables);
  m.def("plan", &plan, pybind11::arg("tokens"), pybind11::arg("rows"), pybind11::arg("nchunks"), pybind11::arg("sms"),
        pybind11::arg("max_threads") = kThreads);
  m.def("set_checks", [](bool on) { g_check = on; });
  m.def("set_force_vector", [](bool on) { g_force_vector = on; });
}
