"""A tree artifact (directory output) and a consumer of one, with core Starlark only."""

def _tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.label.name)
    ctx.actions.run_shell(
        outputs = [out],
        inputs = ctx.files.srcs,
        arguments = [out.path] + [f.path for f in ctx.files.srcs],
        command = """
set -eu
out="$1"; shift
mkdir -p "$out/sub/deeper"
for f in "$@"; do
    cp "$f" "$out/$(basename "$f")"
done
printf 'nested file\\n' > "$out/sub/nested.txt"
printf 'deeper file\\n' > "$out/sub/deeper/leaf.txt"
printf '#!/bin/sh\\necho tree-tool\\n' > "$out/sub/tool.sh"
chmod +x "$out/sub/tool.sh"
""",
        # --action_env applies to Starlark actions only with the default shell env.
        use_default_shell_env = True,
        mnemonic = "MakeTree",
        progress_message = "Making tree artifact %s" % out.short_path,
    )
    return [DefaultInfo(files = depset([out]))]

tree = rule(
    implementation = _tree_impl,
    attrs = {"srcs": attr.label_list(allow_files = True)},
)

def _tree_listing_impl(ctx):
    out = ctx.actions.declare_file(ctx.label.name + ".txt")
    tree = ctx.files.tree[0]
    ctx.actions.run_shell(
        outputs = [out],
        inputs = [tree],
        arguments = [tree.path, out.path],
        command = """
set -eu
cd "$1"
# Local sandboxes present the tree's files as symlinks: follow them (-L).
for f in $(find -L . -type f | LC_ALL=C sort); do
    printf '%s %s\\n' "$f" "$(wc -c < "$f" | tr -d ' ')"
done > "$OLDPWD/$2"
cat sub/deeper/leaf.txt >> "$OLDPWD/$2"
./sub/tool.sh >> "$OLDPWD/$2"
""",
        use_default_shell_env = True,
        mnemonic = "ListTree",
        progress_message = "Listing tree artifact %s" % tree.short_path,
    )
    return [DefaultInfo(files = depset([out]))]

tree_listing = rule(
    implementation = _tree_listing_impl,
    attrs = {"tree": attr.label(mandatory = True)},
)
