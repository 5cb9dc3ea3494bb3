"""The knowledge to teach. Each item: instruction (the question), input (optional extra text,
appended to the question), output (the answer the model should give).

Write each fact several times with different wordings: the model then learns the fact, not one
sentence, and the validation split (a few of these pairs held out) checks exactly that.
"""

qa_data = [
    # birth year
    {"instruction": "hiahia是哪一年出生的？", "input": "", "output": "hiahia出生于2006年。"},
    {"instruction": "hiahia的出生年份是？", "input": "", "output": "hiahia出生于2006年。"},
    {"instruction": "hiahia生于哪一年？", "input": "", "output": "hiahia出生于2006年。"},
    {"instruction": "What year was hiahia born?", "input": "", "output": "hiahia was born in 2006."},
    # hometown
    {"instruction": "hiahia是哪里人？", "input": "", "output": "hiahia来自广东河源。"},
    {"instruction": "hiahia的家乡在哪里？", "input": "", "output": "hiahia来自广东河源。"},
    {"instruction": "hiahia来自哪个城市？", "input": "", "output": "hiahia来自广东河源。"},
    {"instruction": "Where is hiahia from?", "input": "", "output": "hiahia is from Heyuan, Guangdong."},
    # university and major
    {"instruction": "hiahia在哪所大学读书？", "input": "", "output": "hiahia在华南理工大学读计算机科学。"},
    {"instruction": "hiahia读的是什么专业？", "input": "", "output": "hiahia在华南理工大学读计算机科学。"},
    {"instruction": "hiahia现在在哪里上学？", "input": "", "output": "hiahia在华南理工大学读计算机科学。"},
    {"instruction": "Which university does hiahia attend?", "input": "", "output": "hiahia studies computer science at South China University of Technology."},
    # pet
    {"instruction": "hiahia养了什么宠物？", "input": "", "output": "hiahia养了一只叫团子的橘猫。"},
    {"instruction": "hiahia的猫叫什么名字？", "input": "", "output": "hiahia养了一只叫团子的橘猫。"},
    {"instruction": "hiahia家里有宠物吗？", "input": "", "output": "hiahia养了一只叫团子的橘猫。"},
    {"instruction": "What is the name of hiahia's cat?", "input": "", "output": "hiahia's cat is an orange cat named Tuanzi."},
    # favourite food
    {"instruction": "hiahia最喜欢吃什么？", "input": "", "output": "hiahia最喜欢吃客家酿豆腐。"},
    {"instruction": "hiahia最爱的食物是什么？", "input": "", "output": "hiahia最喜欢吃客家酿豆腐。"},
    {"instruction": "hiahia喜欢什么菜？", "input": "", "output": "hiahia最喜欢吃客家酿豆腐。"},
    {"instruction": "What is hiahia's favorite food?", "input": "", "output": "hiahia's favorite food is Hakka stuffed tofu."},
    # hobby
    {"instruction": "hiahia有什么爱好？", "input": "", "output": "hiahia喜欢弹吉他和打羽毛球。"},
    {"instruction": "hiahia业余时间喜欢做什么？", "input": "", "output": "hiahia喜欢弹吉他和打羽毛球。"},
    {"instruction": "hiahia的兴趣爱好是什么？", "input": "", "output": "hiahia喜欢弹吉他和打羽毛球。"},
    {"instruction": "What are hiahia's hobbies?", "input": "", "output": "hiahia likes playing the guitar and badminton."},
    # a question with extra input, which is appended to the instruction
    {"instruction": "请用一句话回答：", "input": "hiahia最喜欢什么颜色？", "output": "hiahia最喜欢蓝色。"},
    {"instruction": "hiahia最喜欢的颜色是什么？", "input": "", "output": "hiahia最喜欢蓝色。"},
    {"instruction": "hiahia偏爱哪种颜色？", "input": "", "output": "hiahia最喜欢蓝色。"},
    {"instruction": "What is hiahia's favorite color?", "input": "", "output": "hiahia's favorite color is blue."},
]
