"""Gemma 4 chat templates (Jinja), written from the published prompt format.

Format (see the Gemma 4 prompt-formatting guide)::

    <bos><|turn>system\\n{system}<turn|>\\n<|turn>user\\n{question}<turn|>\\n<|turn>model\\n{answer}<turn|>\\n

* Roles are ``system``, ``user`` and ``model``; OpenAI's ``assistant`` is written as ``model``.
* ``add_generation_prompt`` appends ``<|turn>model\\n``.
* Content is a string or a list of OpenAI-style parts: ``text`` parts are written as they are, ``image``,
  ``audio`` and ``video`` parts become the placeholders ``<|image|>``, ``<|audio|>`` and ``<|video|>``, which
  ``Gemma4Processor`` expands into ``<|image>`` + n soft tokens + ``<image|>`` (likewise for audio).
* Tool use stays inside the model's turn, as Gemma 4 does it: an assistant message with ``tool_calls`` writes
  ``<|tool_call>call:NAME{json args}<tool_call|>`` and leaves the turn open; each following ``tool`` message
  writes ``<|tool_response>response:NAME{json}<tool_response|>``; the next assistant message continues the
  same turn and closes it. (Arguments and results are JSON here; the released template uses its own
  key:value syntax with ``<|"|>`` string quotes, which this small tokenizer does not have.)
* Thinking variant: a system turn that contains ``<|think|>`` (or ``enable_thinking=True``, which adds it)
  switches thinking on, and an assistant message's ``reasoning_content`` (or ``thinking``) is written as
  ``<|channel>thought\\n...<channel|>`` before the answer. The plain template drops reasoning.

Both templates have the **prefix property** the trainer relies on: rendering ``messages[:k]`` (without a
generation prompt) yields a string prefix of rendering ``messages``. That is why a turn is closed lazily after
a tool call, and why the thinking template keeps the reasoning of earlier turns (the released template drops
it once a new user turn starts, which would break the property).
"""

from __future__ import annotations

# Shared body. ``__THINKING__`` is replaced by ``true``/``false`` to build the two variants, so the turn
# logic is written once. Whitespace control (``{%-``/``-%}``) keeps every newline explicit.
_TEMPLATE_BODY = r"""
{%- set thinking_template = __THINKING__ -%}
{%- macro render_content(content) -%}
    {%- if content is none -%}
    {%- elif content is string -%}{{ content | trim }}
    {%- else -%}
        {%- set acc = namespace(text='') -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}{%- set acc.text = acc.text + part['text'] -%}
            {%- elif part['type'] in ['image', 'image_url'] -%}{%- set acc.text = acc.text + '<|image|>' -%}
            {%- elif part['type'] in ['audio', 'input_audio'] -%}{%- set acc.text = acc.text + '<|audio|>' -%}
            {%- elif part['type'] == 'video' -%}{%- set acc.text = acc.text + '<|video|>' -%}
            {%- else -%}{{ raise_exception('Unsupported content part type: ' ~ part['type']) }}
            {%- endif -%}
        {%- endfor -%}
        {{- acc.text | trim -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro render_json(value) -%}
    {%- if value is string -%}{{ value }}{%- else -%}{{ value | tojson }}{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set ns = namespace(open_model=false, call_names=[], tool_index=0, think=false) -%}
{%- if thinking_template and enable_thinking is defined and enable_thinking -%}
    {%- set ns.think = true -%}
    {%- if messages | length == 0 or messages[0]['role'] != 'system' -%}
        {{- '<|turn>system\n<|think|><turn|>\n' -}}
    {%- endif -%}
{%- endif -%}
{%- for message in messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- if role not in ['system', 'user', 'model', 'tool'] -%}
        {{- raise_exception('Unsupported role: ' ~ message['role']) -}}
    {%- endif -%}
    {%- if role == 'tool' -%}
        {%- if not ns.open_model -%}
            {{- raise_exception('A tool message must follow an assistant message with tool_calls.') -}}
        {%- endif -%}
        {%- if message.get('name') -%}{%- set name = message['name'] -%}
        {%- elif ns.tool_index < ns.call_names | length -%}{%- set name = ns.call_names[ns.tool_index] -%}
        {%- else -%}{%- set name = 'tool' -%}{%- endif -%}
        {%- set ns.tool_index = ns.tool_index + 1 -%}
        {%- set result = message['content'] -%}
        {%- if result is string -%}{%- set result = {'value': result} -%}{%- endif -%}
        {{- '<|tool_response>response:' ~ name ~ (result | tojson) ~ '<tool_response|>' -}}
    {%- else -%}
        {%- if ns.open_model and role != 'model' -%}
            {{- '<turn|>\n' -}}
            {%- set ns.open_model = false -%}
        {%- endif -%}
        {%- if not ns.open_model -%}{{- '<|turn>' ~ role ~ '\n' -}}{%- endif -%}
        {%- set has_think = '<|think|>' in (message['content'] | string) -%}
        {%- if role == 'system' and thinking_template and ns.think and not has_think -%}
            {{- '<|think|>' -}}
        {%- endif -%}
        {%- if role == 'model' and thinking_template -%}
            {%- set reasoning = message.get('reasoning_content') or message.get('thinking') -%}
            {%- if reasoning -%}{{- '<|channel>thought\n' ~ (reasoning | trim) ~ '<channel|>' -}}{%- endif -%}
        {%- endif -%}
        {{- render_content(message['content']) -}}
        {%- if role == 'model' and message.get('tool_calls') -%}
            {%- set ns.call_names = [] -%}
            {%- set ns.tool_index = 0 -%}
            {%- for call in message['tool_calls'] -%}
                {%- set fn = call['function'] if call.get('function') else call -%}
                {%- set ns.call_names = ns.call_names + [fn['name']] -%}
                {{- '<|tool_call>call:' ~ fn['name'] ~ render_json(fn.get('arguments', {})) ~ '<tool_call|>' -}}
            {%- endfor -%}
            {%- set ns.open_model = true -%}
        {%- else -%}
            {{- '<turn|>\n' -}}
            {%- set ns.open_model = false -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not ns.open_model -%}{{- '<|turn>model\n' -}}{%- endif -%}
"""

GEMMA4_CHAT_TEMPLATE: str = _TEMPLATE_BODY.replace("__THINKING__", "false").strip()
"""Gemma 4 chat template without thinking: reasoning fields are dropped, ``<|think|>`` is plain content."""

GEMMA4_THINKING_CHAT_TEMPLATE: str = _TEMPLATE_BODY.replace("__THINKING__", "true").strip()
"""Gemma 4 chat template with thinking: ``enable_thinking`` / ``<|think|>`` and ``<|channel>thought`` blocks."""

__all__ = ["GEMMA4_CHAT_TEMPLATE", "GEMMA4_THINKING_CHAT_TEMPLATE"]
