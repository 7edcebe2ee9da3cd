// csrc/device_guard.h against a fake CUDA runtime: which device is current after each
// scope, and which runtime calls were made. Built and run by tests/test_cuda_build.py
// (a CPU machine cannot run cudaSetDevice, but the restore logic is all in the guard).
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "device_guard.h"

namespace {

struct Fake {
  static int current;           // the runtime's current device
  static int fail_get, fail_set;
  static std::vector<int> sets;
  static int get(int* d) {
    if (fail_get) return fail_get;
    *d = current;
    return 0;
  }
  static int set(int d) {
    sets.push_back(d);
    if (fail_set) return fail_set;
    current = d;
    return 0;
  }
  static void fail(int e, const char* what) {
    throw std::runtime_error(std::string(what) + " failed: " + std::to_string(e));
  }
  static void reset(int dev) { current = dev; fail_get = fail_set = 0; sets.clear(); }
};
int Fake::current = 0, Fake::fail_get = 0, Fake::fail_set = 0;
std::vector<int> Fake::sets;

using Guard = aim::DeviceGuard<Fake>;
int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) { std::printf("FAIL: %s\n", what); ++failures; }
}

}  // namespace

int main() {
  Fake::reset(0);                             // an op on cuda:1 while torch is on 0
  { Guard g(1); expect(Fake::current == 1, "the op runs on its device"); }
  expect(Fake::current == 0, "the caller's device is current again after the op");
  expect(Fake::sets == std::vector<int>({1, 0}), "set to the op's device, then back");

  Fake::reset(2);                             // same device: no runtime call at all
  { Guard g(2); }
  expect(Fake::current == 2 && Fake::sets.empty(), "no set when the device is current");

  Fake::reset(0);                             // a launch that throws still restores
  try {
    Guard g(3);
    throw std::runtime_error("launch failed");
  } catch (const std::runtime_error&) {}
  expect(Fake::current == 0, "restored when the op throws");

  Fake::reset(0);                             // nested: each scope gives back its own
  { Guard a(1); { Guard b(2); expect(Fake::current == 2, "inner"); }
    expect(Fake::current == 1, "outer again after inner"); }
  expect(Fake::current == 0, "caller's after both");

  Fake::reset(0);
  Fake::fail_set = 101;                       // the device cannot be made current
  bool threw = false;
  try { Guard g(5); } catch (const std::runtime_error&) { threw = true; }
  expect(threw, "a failing set throws");
  expect(Fake::sets == std::vector<int>({5}), "and nothing is restored that was not changed");

  Fake::reset(0);
  Fake::fail_get = 3;
  threw = false;
  try { Guard g(1); } catch (const std::runtime_error&) { threw = true; }
  expect(threw && Fake::sets.empty(), "a failing get throws before any set");

  if (failures == 0) std::printf("device_guard: all checks passed\n");
  return failures ? 1 : 0;
}
