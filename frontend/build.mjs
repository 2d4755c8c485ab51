// Bundles src/*.js into ../static/build/ and copies xterm's stylesheet beside them.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "static", "build");
mkdirSync(out, { recursive: true });
const entries = readdirSync(join(here, "src")).filter((f) => f.endsWith(".js")).map((f) => join(here, "src", f));
await build({ entryPoints: entries, bundle: true, format: "esm", minify: true, sourcemap: true, outdir: out, target: "es2020" });
copyFileSync(join(here, "node_modules", "@xterm", "xterm", "css", "xterm.css"), join(out, "xterm.css"));
writeFileSync(join(out, ".built"), new Date().toISOString() + "\n");
console.log(`built ${entries.length} module(s) into ${out}`);
