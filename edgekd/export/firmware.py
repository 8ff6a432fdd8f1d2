"""Benchmark firmware source for TFLite Micro targets: `firmware/main.cc` + `firmware/README.md` in the bundle.

main.cc runs the model from the bundle's C array in TFLite Micro with the measured arena (plus headroom), fills
the input with a fixed xorshift32 pattern, times warm-up + N invocations with the core's cycle counter (DWT
CYCCNT on Cortex-M, the CPU cycle counter on ESP32, a two-function hook elsewhere) and prints fixed lines:

    EDGEKD-BENCH v1 begin model=<stem> model_len=<bytes> model_fnv1a=<8 hex> arena_bytes=<n> cpu_hz=<n> runs=<n> warmup=<n>
    EDGEKD-BENCH v1 arena used=<bytes>
    EDGEKD-BENCH v1 run i=<k> cycles=<n>          (N lines)
    EDGEKD-BENCH v1 output values=<q0>,<q1>,...   (int8 output for the pattern input)
    EDGEKD-BENCH v1 end status=ok                 (or: EDGEKD-BENCH v1 error stage=<stage>)

The benchmark repeats every 5 s (EDGEKD_BENCH_REPEAT_S; 0: once), so the host may open the port at any time.
`edgekd profile --serial PORT` (edgekd/profile/serial_bench.py) reads them, checks the model length and hash
against the bundle and the output against the host's TFLite Micro for the same pattern. The source has not been
compiled or run here: no package installable on the development machines ships TFLite Micro's headers.
"""
from __future__ import annotations

import numpy as np

PREFIX = "EDGEKD-BENCH"
VERSION = "v1"
DEFAULT_RUNS = 50
DEFAULT_WARMUP = 3
ARENA_HEADROOM = 16 * 1024  # optimised kernels (CMSIS-NN, ESP-NN) may ask for scratch the host's reference kernels did not
PATTERN_SEED = 0x2545F491

# builtin op -> MicroMutableOpResolver method (TFLite Micro's names)
RESOLVER = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "CAST": "AddCast",
    "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "ELU": "AddElu", "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor", "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather", "HARD_SWISH": "AddHardSwish", "L2_NORMALIZATION": "AddL2Normalization",
    "LEAKY_RELU": "AddLeakyRelu", "LOGISTIC": "AddLogistic", "MAX_POOL_2D": "AddMaxPool2D", "MAXIMUM": "AddMaximum",
    "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MUL": "AddMul", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2",
    "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize", "REDUCE_MAX": "AddReduceMax", "RELU": "AddRelu", "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "RSQRT": "AddRsqrt", "SHAPE": "AddShape",
    "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQUEEZE": "AddSqueeze", "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub", "SUM": "AddSum", "TANH": "AddTanh", "TRANSPOSE": "AddTranspose", "UNPACK": "AddUnpack",
    "ZEROS_LIKE": "AddZerosLike",
}


def pattern(n: int, seed: int = PATTERN_SEED) -> np.ndarray:
    """The firmware's input: xorshift32 (13, 17, 5) from `seed`, the top byte of each state as int8."""
    out = np.empty(n, np.int8)
    s = seed
    for i in range(n):
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        out[i] = np.uint8(s >> 24).view(np.int8)
    return out


def fnv1a32(data: bytes) -> int:
    """FNV-1a over the model bytes: the firmware prints it so the host knows which model the board runs."""
    h = 0x811C9DC5
    arr = np.frombuffer(data, np.uint8)
    for b in arr.tolist():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def write_firmware(out_dir, *, stem: str, header: str, symbol: str, upper: str, ops: dict, arena_bytes: int,
                   cpu_hz: int | None, runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP) -> dict:
    """Writes out_dir/firmware/main.cc and README.md; returns what the manifest records."""
    from pathlib import Path

    folder = Path(out_dir) / "firmware"
    folder.mkdir(exist_ok=True)
    missing = [op for op in ops if op not in RESOLVER]
    adds = "\n".join(f"  resolver.{RESOLVER[op]}();" for op in ops if op in RESOLVER)
    if missing:  # the export still succeeds: the build stops here and says what to add
        adds += "\n" + "\n".join(f'#error "edgekd: no resolver method known for {op}: add resolver.AddXxx() for it"'
                                 for op in missing)
    main = _MAIN.format(helpers=HELPERS, stem=stem, header=header, sym=symbol, UP=upper, n_ops=max(1, len(ops)), adds=adds, runs=runs,
                        warmup=warmup, headroom=ARENA_HEADROOM, prefix=f"{PREFIX} {VERSION}", seed=f"0x{PATTERN_SEED:08X}u",
                        ops=", ".join(ops))
    (folder / "main.cc").write_text(main)
    (folder / "README.md").write_text(_README.format(stem=stem, header=header, arena=arena_bytes, runs=runs,
                                                     headroom=ARENA_HEADROOM, cpu_hz=cpu_hz or "the core clock"))
    return {"folder": folder.name, "files": ["main.cc", "README.md"], "runs": runs, "warmup": warmup,
            "arena_headroom_bytes": ARENA_HEADROOM, "line_prefix": f"{PREFIX} {VERSION}",
            "input": f"xorshift32 pattern from 0x{PATTERN_SEED:08X} (top byte as int8)", "missing_resolver_ops": missing,
            "compiled": False, "compiled_note": "not compiled here: no installable package ships TFLite Micro's headers "
                                                "(the tflite-micro wheel has none); not run on a board by edgekd"}


# Board-independent helpers of main.cc (standard C++ only): the tests compile them with g++ and check them against
# pattern() and fnv1a32() above.
HELPERS = """\
// Numbers are formatted here, not by printf: some MicroPrintf ports print only strings and plain %d.
char* Put(char* p, const char* s) {
  while (*s) *p++ = *s++;
  *p = 0;
  return p;
}

char* PutU32(char* p, uint32_t v) {
  char digits[10];
  int n = 0;
  do {
    digits[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v);
  while (n) *p++ = digits[--n];
  *p = 0;
  return p;
}

char* PutI32(char* p, int32_t v) {
  if (v < 0) {
    *p++ = '-';
    return PutU32(p, static_cast<uint32_t>(-(v + 1)) + 1u);
  }
  return PutU32(p, static_cast<uint32_t>(v));
}

char* PutHex32(char* p, uint32_t v) {
  for (int shift = 28; shift >= 0; shift -= 4) *p++ = "0123456789abcdef"[(v >> shift) & 0xFu];
  *p = 0;
  return p;
}

// FNV-1a over the model bytes: the host compares it with the bundle's .tflite.
uint32_t Fnv1a(const unsigned char* data, uint32_t n) {
  uint32_t hash = 0x811C9DC5u;
  for (uint32_t i = 0; i < n; ++i) hash = (hash ^ data[i]) * 0x01000193u;
  return hash;
}

// The input: xorshift32 (13, 17, 5), top byte of each state; the host regenerates it to check the output.
void FillPattern(int8_t* out, size_t n, uint32_t s) {
  for (size_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    out[i] = static_cast<int8_t>(static_cast<uint8_t>(s >> 24));
  }
}

"""

_MAIN = """\
// Benchmark firmware generated by edgekd for {stem}: runs the model from the C array in TensorFlow Lite Micro,
// times {runs} invocations with the core's cycle counter and prints the "{prefix}" lines that
// `edgekd profile RUN --target T --serial PORT` reads. Build steps: README.md beside this file.
// Model ops: {ops}.
#include <stddef.h>
#include <stdint.h>

#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "tensorflow/lite/schema/schema_generated.h"

#include "{header}"

#if defined(ARDUINO)
#include <Arduino.h>
#elif defined(ESP_PLATFORM)
#include "freertos/FreeRTOS.h"
#include "freertos/task.h"
#endif

#ifndef EDGEKD_BENCH_RUNS
#define EDGEKD_BENCH_RUNS {runs}
#endif
#ifndef EDGEKD_BENCH_WARMUP
#define EDGEKD_BENCH_WARMUP {warmup}
#endif
#ifndef EDGEKD_BENCH_REPEAT_S
#define EDGEKD_BENCH_REPEAT_S 5
#endif
// The arena was measured with reference kernels on a 64-bit host; optimised kernels may need scratch on top.
#ifndef EDGEKD_ARENA_HEADROOM
#define EDGEKD_ARENA_HEADROOM {headroom}
#endif
// Put the arena in a given RAM region, e.g. -DEDGEKD_ARENA_SECTION='__attribute__((section(".axisram")))'
#ifndef EDGEKD_ARENA_SECTION
#define EDGEKD_ARENA_SECTION
#endif

// ---- The cycle counter: the only board-specific part. EDGEKD_HOST_BUILD (a compile check on a PC) counts
// nanoseconds as cycles of a 1 GHz clock.
#if defined(EDGEKD_HOST_BUILD)
#include <chrono>
static void CycleCounterStart() {{}}
static uint32_t CycleCount() {{
  return static_cast<uint32_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now().time_since_epoch()).count());
}}
static uint32_t CpuHz() {{ return 1000000000u; }}
#elif defined(__ARM_ARCH_7M__) || defined(__ARM_ARCH_7EM__) || defined(__ARM_ARCH_8M_MAIN__) || \\
    defined(__ARM_ARCH_8_1M_MAIN__)
// Cortex-M3/M4/M7/M33/M55: DWT->CYCCNT, written at its architectural addresses so no device header is needed.
#define EDGEKD_DEMCR (*(volatile uint32_t*)0xE000EDFCu)
#define EDGEKD_DWT_CTRL (*(volatile uint32_t*)0xE0001000u)
#define EDGEKD_DWT_CYCCNT (*(volatile uint32_t*)0xE0001004u)
#define EDGEKD_DWT_LAR (*(volatile uint32_t*)0xE0001FB0u)
extern "C" uint32_t SystemCoreClock;  // CMSIS: set by the vendor's system_<device>.c / clock setup
static void CycleCounterStart() {{
  EDGEKD_DEMCR |= (1u << 24);    // TRCENA: power the DWT
  EDGEKD_DWT_LAR = 0xC5ACCE55u;  // unlock (needed on some Cortex-M7 parts, ignored elsewhere)
  EDGEKD_DWT_CYCCNT = 0;
  EDGEKD_DWT_CTRL |= 1u;  // CYCCNTENA
}}
static uint32_t CycleCount() {{ return EDGEKD_DWT_CYCCNT; }}
#if defined(EDGEKD_CPU_HZ)
static uint32_t CpuHz() {{ return EDGEKD_CPU_HZ; }}
#else
static uint32_t CpuHz() {{ return SystemCoreClock; }}
#endif
#elif defined(ESP_PLATFORM)
// ESP32 / ESP32-S3 (ESP-IDF 5): the CPU cycle counter; the clock from the sdkconfig default.
#include "esp_cpu.h"
#include "sdkconfig.h"
static void CycleCounterStart() {{}}
static uint32_t CycleCount() {{ return static_cast<uint32_t>(esp_cpu_get_cycle_count()); }}
#if defined(EDGEKD_CPU_HZ)
static uint32_t CpuHz() {{ return EDGEKD_CPU_HZ; }}
#else
static uint32_t CpuHz() {{ return CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ * 1000000u; }}
#endif
#else
// Any other core: define these two in your port (a free-running 32-bit counter and its rate in Hz).
extern "C" uint32_t edgekd_cycle_count(void);
extern "C" uint32_t edgekd_cpu_hz(void);
static void CycleCounterStart() {{}}
static uint32_t CycleCount() {{ return edgekd_cycle_count(); }}
static uint32_t CpuHz() {{ return edgekd_cpu_hz(); }}
#endif

namespace {{

alignas(16) EDGEKD_ARENA_SECTION uint8_t tensor_arena[{UP}_ARENA_SIZE + EDGEKD_ARENA_HEADROOM];
char line[64 + 5 * {UP}_NUM_CLASSES];

{helpers}void Emit() {{ MicroPrintf("%s", line); }}

void Error(const char* stage) {{
  Put(Put(line, "{prefix} error stage="), stage);
  Emit();
}}

// One benchmark: the begin line, warm-up, the timed runs, the output, the end line. False after an error.
bool RunOnce(tflite::MicroInterpreter& interpreter, uint32_t hash) {{
  char* p = Put(line, "{prefix} begin model={stem} model_len=");
  p = PutU32(p, {sym}_model_len);
  p = PutHex32(Put(p, " model_fnv1a="), hash);
  p = PutU32(Put(p, " arena_bytes="), sizeof(tensor_arena));
  p = PutU32(Put(p, " cpu_hz="), CpuHz());
  p = PutU32(Put(p, " runs="), EDGEKD_BENCH_RUNS);
  PutU32(Put(p, " warmup="), EDGEKD_BENCH_WARMUP);
  Emit();
  PutU32(Put(line, "{prefix} arena used="), static_cast<uint32_t>(interpreter.arena_used_bytes()));
  Emit();
  TfLiteTensor* input = interpreter.input(0);
  FillPattern(input->data.int8, input->bytes, {seed});
  for (int i = 0; i < EDGEKD_BENCH_WARMUP; ++i) {{
    if (interpreter.Invoke() != kTfLiteOk) {{
      Error("invoke");
      return false;
    }}
  }}
  for (int i = 0; i < EDGEKD_BENCH_RUNS; ++i) {{
    const uint32_t start = CycleCount();
    const TfLiteStatus status = interpreter.Invoke();
    const uint32_t cycles = CycleCount() - start;  // unsigned: correct across one counter wrap
    if (status != kTfLiteOk) {{
      Error("invoke");
      return false;
    }}
    p = PutU32(Put(line, "{prefix} run i="), static_cast<uint32_t>(i));
    PutU32(Put(p, " cycles="), cycles);
    Emit();
  }}
  const TfLiteTensor* output = interpreter.output(0);
  p = Put(line, "{prefix} output values=");
  for (size_t i = 0; i < output->bytes && i < {UP}_NUM_CLASSES; ++i) {{
    if (i) p = Put(p, ",");
    p = PutI32(p, output->data.int8[i]);
  }}
  Emit();
  Put(line, "{prefix} end status=ok");
  Emit();
  return true;
}}

// Between repetitions: the platform's sleep where there is one (an RTOS watchdog must not see a busy loop).
void Pause(uint32_t seconds) {{
#if defined(ARDUINO)
  delay(seconds * 1000u);
#elif defined(ESP_PLATFORM)
  vTaskDelay(pdMS_TO_TICKS(seconds * 1000u));
#else
  for (uint32_t s = 0; s < seconds; ++s) {{
    const uint32_t start = CycleCount();
    while (CycleCount() - start < CpuHz()) {{
    }}
  }}
#endif
}}

}}  // namespace

extern "C" void edgekd_benchmark(void) {{
  tflite::InitializeTarget();
  CycleCounterStart();
  const uint32_t hash = Fnv1a({sym}_model, {sym}_model_len);  // the host compares it with the bundle's .tflite

  const char* failed = nullptr;  // the stage that failed; its error line repeats like a benchmark would
  const tflite::Model* model = tflite::GetModel({sym}_model);
  if (model->version() != TFLITE_SCHEMA_VERSION) failed = "schema";
  static tflite::MicroMutableOpResolver<{n_ops}> resolver;
{adds}
  static tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, sizeof(tensor_arena));
  if (failed == nullptr && interpreter.AllocateTensors() != kTfLiteOk) failed = "allocate";
  // repeated, so `edgekd profile --serial` can open the port at any time; EDGEKD_BENCH_REPEAT_S=0 runs once
  for (;;) {{
    if (failed != nullptr) {{
      Error(failed);
    }} else if (!RunOnce(interpreter, hash)) {{
      failed = "invoke";
    }}
    if (EDGEKD_BENCH_REPEAT_S == 0) return;
    Pause(EDGEKD_BENCH_REPEAT_S);
  }}
}}

// Entry points: Arduino runs setup(); ESP-IDF runs app_main(); elsewhere main(), unless the project has its own
// (STM32Cube: define EDGEKD_NO_MAIN and call edgekd_benchmark() after the clock and UART are set up).
#if defined(ARDUINO)
void setup() {{
  Serial.begin(115200);
  while (!Serial) {{
  }}
  edgekd_benchmark();
}}
void loop() {{}}
#elif defined(ESP_PLATFORM)
extern "C" void app_main(void) {{ edgekd_benchmark(); }}
#elif !defined(EDGEKD_NO_MAIN)
int main() {{
  edgekd_benchmark();
  return 0;
}}
#endif
"""

_README = """\
# Benchmark firmware for {stem}

`main.cc` runs `{stem}` from the C array (`../{header}` and its `.cc`) in TensorFlow Lite Micro with a tensor arena
of {arena:,} B (measured on the export host) + {headroom:,} B headroom, times {runs} invocations after warm-up with
the core's cycle counter and prints `EDGEKD-BENCH v1 ...` lines on the debug console (`MicroPrintf`). On the
host, with the board's serial port:

    edgekd profile RUN --target TARGET --serial /dev/ttyACM0        # 115200 baud by default (--baud)

reads those lines, checks the model length and FNV-1a hash against the bundle, compares the int8 output for
the fixed input pattern with TFLite Micro on the host, and stores p50/p90/p99 (cycles / cpu_hz) beside the
estimate; `--calibrate` refits the target's latency coefficients to it.

Status: generated from a template; **not compiled or run on a board by edgekd** (no package installable on
the development machines ships TFLite Micro's headers). Report what breaks.

Common to every build:
- Add `main.cc`, `../{header}` and `../{stem}.cc` to the project, with TFLite Micro (ideally its optimised
  kernels: CMSIS-NN on Cortex-M, ESP-NN on ESP32) on the include path.
- The timer: Cortex-M3/M4/M7/M33/M55 use the DWT cycle counter and CMSIS `SystemCoreClock` (define
  `EDGEKD_CPU_HZ=...` if your port has none); ESP32 uses `esp_cpu_get_cycle_count()` and
  `CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ`; any other core needs `edgekd_cycle_count()` and `edgekd_cpu_hz()` from you.
- The benchmark repeats every 5 s, so `edgekd profile --serial` can be started at any time (it takes the first
  complete run after it opened the port); `-DEDGEKD_BENCH_REPEAT_S=0` runs it once.
- Options: `-DEDGEKD_BENCH_RUNS=N`, `-DEDGEKD_BENCH_WARMUP=N`, `-DEDGEKD_ARENA_HEADROOM=BYTES`,
  `-DEDGEKD_ARENA_SECTION='__attribute__((section(".axisram")))'` (put the arena in a given RAM).
- The clock printed as `cpu_hz` (expected {cpu_hz}) turns cycles into milliseconds: check it matches your clock tree.

## STM32Cube (STM32CubeIDE / CMake)
1. Generate a TFLite Micro source tree with CMSIS-NN kernels from a tflite-micro checkout:
   `python3 tensorflow/lite/micro/tools/project_generation/create_tflm_tree.py --makefile_options="TARGET=cortex_m_generic TARGET_ARCH=cortex-m7 OPTIMIZED_KERNEL_DIR=cmsis_nn" tflm`
   (`cortex-m4+fp`, `cortex-m33` ... for other cores) and add `tflm/` to the project (sources and include path).
2. Route TFLM's debug log to a UART: in the `cortex_m_generic` port call `RegisterDebugLogCallback()` with a
   function that sends the string with `HAL_UART_Transmit` (end lines with "\\r\\n" if your terminal needs it).
3. Build with `-DEDGEKD_NO_MAIN` and call `edgekd_benchmark()` from CubeMX's `main()` after `SystemClock_Config()`
   and the UART init. Optimise (`-O2` or `-O3`); enable the I/D caches on Cortex-M7 as your product will.

## Arduino (Arduino IDE / arduino-cli)
1. Install a TFLite Micro library for your board (for example Chirale_TensorFlowLite from the Library Manager).
2. Make a sketch folder `edgekd_bench/` with an empty `edgekd_bench.ino`, `main.cc`, `{header}` and `{stem}.cc`
   (change `#include "{header}"` if you keep the header elsewhere).
3. Upload; `setup()` runs the benchmark (repeating) and prints to `Serial` at 115200 baud.

## ESP-IDF (ESP32-S3)
1. `idf.py create-project edgekd_bench`, then `idf.py add-dependency "espressif/esp-tflite-micro"` (brings ESP-NN).
2. Put `main.cc`, `{header}` and `{stem}.cc` in `main/` and list the two `.cc` files in `main/CMakeLists.txt`.
3. `idf.py set-target esp32s3 build flash monitor`: `app_main()` runs the benchmark; close the monitor before
   `edgekd profile --serial` opens the port. A large arena may need PSRAM (`EDGEKD_ARENA_SECTION` with `EXT_RAM_BSS_ATTR`).
"""
