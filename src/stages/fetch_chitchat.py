"""Stage 0: write the chitchat corpus from the pinned ``chitchat_dataset`` package as a CSV."""

from nextword import stage
from nextword.chitchat import chitchat_messages
from nextword.files import atomic_path


def main(args, params):
    df = chitchat_messages()
    with atomic_path(args.out) as tmp:
        df.to_csv(tmp, index=False)
    print(f"{args.out}: {df['conversation_id'].nunique()} conversations, {len(df)} messages")


if __name__ == "__main__":
    stage.run(main, "out", description=__doc__)
